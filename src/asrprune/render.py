"""Report blocks and their two renderings: Markdown, and one self-contained HTML page (torch-free).

A report is a list of blocks: ``("h1"|"h2"|"h3"|"p"|"ul"|"toc", content)`` tuples, :class:`Table`,
:class:`Image` and :class:`Details`. :func:`render_markdown` links images relative to the report;
:func:`render_html` inlines the CSS and the images (base64), so the page works offline, with a
contents line, headings with anchors, tables that wrap instead of scrolling sideways, and
``<details>`` blocks for the word alignments.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["Block", "Details", "Image", "Table", "render_html", "render_markdown"]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Image:
    path: Path  # absolute
    alt: str
    caption: str = ""


Block = tuple  # ("h1"|"h2"|"h3"|"p"|"ul", text or list) | Table | Image


@dataclass
class Details:
    """A collapsible block (``<details>`` in HTML, a heading and plain text in Markdown)."""

    summary: str
    text: str  # Markdown / plain form
    html: str  # HTML body (trusted: built here, escaped)


# ----------------------------------------------------------------------------------------------


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _anchor(text: str) -> str:
    return "sec-" + re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _toc(blocks: Sequence[Block]) -> list[tuple[str, str]]:
    return [(b[1], _anchor(b[1])) for b in blocks if isinstance(b, tuple) and b[0] == "h2"]


def render_markdown(blocks: Sequence[Block], base: Path) -> str:
    """Markdown with images linked relative to ``base`` (the directory report.md is written to)."""
    out = []
    for b in blocks:
        if isinstance(b, Details):
            out.append(f"**{b.summary}**\n")
            out.append("```text\n" + b.text + "\n```\n")
            continue
        if isinstance(b, tuple) and b[0] == "toc":
            out.append("Contents: " + " · ".join(f"[{t}](#{a})" for t, a in _toc(blocks)) + "\n")
            continue
        if isinstance(b, tuple) and b[0] == "h2":
            out.append(f'<a id="{_anchor(b[1])}"></a>\n')
        if isinstance(b, Table):
            if b.caption:
                out.append(b.caption + "\n")
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + "|".join(" --- " for _ in b.headers) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Image):
            rel = Path(_relpath(b.path, base))
            out.append(f"![{b.alt}]({rel.as_posix()})\n")
            if b.caption:
                out.append(f"*{b.caption}*\n")
        else:
            kind, content = b
            if kind in ("h1", "h2", "h3"):
                out.append("#" * int(kind[1]) + " " + content + "\n")
            elif kind == "ul":
                out += [f"- {item}" for item in content] + [""]
            else:
                out.append(content + "\n")
    return "\n".join(out).rstrip() + "\n"


def _relpath(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1180px;
padding:0 1em;color:#222;line-height:1.4;overflow-wrap:anywhere}
nav{font-size:13px;margin:.5em 0 1em} nav a{margin-right:.9em;white-space:nowrap}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px;width:100%;table-layout:auto}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere;
font-variant-numeric:tabular-nums}
th{background:#f2f2f2;font-weight:600} td.num{text-align:right}
caption{caption-side:top;text-align:left;font-size:12px;color:#555;padding-bottom:4px}
figure{margin:1em 0} figcaption{font-size:12px;color:#555} img{max-width:100%;height:auto}
details{margin:.4em 0;border:1px solid #ddd;border-radius:4px;padding:.3em .6em}
summary{cursor:pointer;font-size:14px}
.utt{margin:.6em 0}.uid{margin:.2em 0}.lbl{margin:.2em 0 0;font-size:11px;color:#666}
.align{display:block;line-height:1.1}
.w{display:inline-block;margin:0 2px 4px 0;text-align:center;font-family:ui-monospace,Menlo,monospace;font-size:12px}
.w .r,.w .h{display:block;padding:0 2px}.w .r{color:#555}
.w.sub .h{background:#fde0b8}.w.del .h{background:#f6c4c4}.w.ins .h{background:#cdeccd}.w.ins .r{color:#aaa}
"""


_NUMERIC = re.compile(r"^(?:[-+−]?\d[\d.,]*(?:%| /)?|—|<0\.001)(?:\s|$|\[)")


def render_html(blocks: Sequence[Block]) -> str:
    """A self-contained HTML page: inline CSS, images as base64 data URIs, no external links."""
    e = html.escape
    body = []
    title = "asrprune study report"
    for b in blocks:
        if isinstance(b, Details):
            body.append(f"<details><summary>{e(b.summary)}</summary>{b.html}</details>")
            continue
        if isinstance(b, tuple) and b[0] == "toc":
            body.append("<nav>Contents: " + "".join(f'<a href="#{a}">{e(t)}</a>' for t, a in _toc(blocks)) + "</nav>")
            continue
        if isinstance(b, Table):
            rows = "".join("<tr>" + "".join(f'<td class="num">{e(str(c))}</td>' if _NUMERIC.match(str(c)) else
                                            f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(
                f'<table class="results"><caption>{e(b.caption)}</caption><thead><tr>'
                + "".join(f"<th>{e(h)}</th>" for h in b.headers)
                + f"</tr></thead><tbody>{rows}</tbody></table>"
            )
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(b.alt)}">'
                f"<figcaption>{e(b.caption)}</figcaption></figure>"
            )
        else:
            kind, content = b
            if kind == "h1":
                title = content
            if kind == "h2":
                body.append(f'<h2 id="{_anchor(content)}">{e(content)}</h2>')
            elif kind in ("h1", "h3"):
                body.append(f"<{kind}>{e(content)}</{kind}>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in content) + "</ul>")
            else:
                body.append(f"<p>{e(content)}</p>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
