"""The evidence behind a change, from per-utterance rows alone (torch-free).

- :func:`paired_change`: ΔWER and ΔCER of run b against run a on the utterances both scored, each
  with its paired percentile bootstrap interval and two-sided paired permutation p (the procedure
  of :func:`asrprune.evaluation.compare`, which calls this), and the utterances that carry the
  change;
- :func:`align_words`: the word alignment of a reference and a hypothesis (jiwer's), as
  ``(op, ref word, hyp word)`` triples; :func:`aligned_text` (terminal, Markdown) and
  :func:`aligned_html` (the report) show it with the errors marked.

The report uses these on result files that predate ``delta_cer`` in ``compare``.
"""

from __future__ import annotations

import html
from typing import Any, Mapping, Sequence

import jiwer
import numpy as np

from .stats import paired_bootstrap, permutation_pvalue, ratio

__all__ = ["aligned_html", "aligned_text", "align_words", "is_scored", "paired_change", "scored_ids"]


def _errors(row: Mapping) -> int:
    return int(row.get("substitutions", 0)) + int(row.get("deletions", 0)) + int(row.get("insertions", 0))


def _char_errors(row: Mapping) -> int:
    return int(row.get("char_substitutions", 0)) + int(row.get("char_deletions", 0)) + int(row.get("char_insertions", 0))


def is_scored(row: Mapping, policy: str) -> bool:
    """A row counts in WER unless it failed, or has an empty reference under ``skip``."""
    if row.get("failed") or row.get("skipped"):
        return False
    return policy == "score" or int(row.get("ref_words", 0) or 0) > 0


def scored_ids(rows_a: Mapping[str, Mapping], rows_b: Mapping[str, Mapping], order: Sequence[str],
               policy: str = "skip") -> list[str]:
    """The ids (in ``order``) that both runs scored."""
    return [i for i in order if i in rows_a and i in rows_b and is_scored(rows_a[i], policy) and is_scored(rows_b[i], policy)]


def paired_change(
    rows_a: Sequence[Mapping],
    rows_b: Sequence[Mapping],
    *,
    policy: str = "skip",
    n_resamples: int = 1000,
    n_permutations: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: Sequence | None = None,
    top_k: int = 5,
) -> dict[str, Any]:
    """Run b against run a on the utterances both scored.

    Returns:
        ``{"n", "ids", "delta_wer", "delta_ci", "p_value", "delta_cer", "delta_cer_ci", "p_value_cer",
        "top" (ids of the ``top_k`` utterances that carry the WER change in its direction),
        "top_share", "delta_wer_without_top"}``; fractions.
    """
    a = {r["id"]: r for r in rows_a}
    b = {r["id"]: r for r in rows_b}
    ids = scored_ids(a, b, [r["id"] for r in rows_a], policy)
    ea = np.array([_errors(a[i]) for i in ids], dtype=np.float64)
    eb = np.array([_errors(b[i]) for i in ids], dtype=np.float64)
    w = np.array([int(a[i].get("ref_words", 0)) for i in ids], dtype=np.float64)
    ca = np.array([_char_errors(a[i]) for i in ids], dtype=np.float64)
    cb = np.array([_char_errors(b[i]) for i in ids], dtype=np.float64)
    c = np.array([int(a[i].get("ref_chars", 0)) for i in ids], dtype=np.float64)
    kw = dict(n_resamples=n_resamples, confidence=confidence, seed=seed, groups=groups)
    d = eb - ea
    out: dict[str, Any] = {
        "n": len(ids), "ids": ids,
        "delta_wer": ratio(d.sum(), w.sum()) if d.sum() else 0.0,
        "delta_ci": paired_bootstrap(ea, eb, w, **kw) if len(ids) else (0.0, 0.0),
        "p_value": permutation_pvalue(ea, eb, n_permutations=n_permutations, seed=seed, groups=groups) if len(ids) else 1.0,
        "delta_cer": ratio((cb - ca).sum(), c.sum()) if (cb - ca).sum() else 0.0,
        "delta_cer_ci": paired_bootstrap(ca, cb, c, **kw) if len(ids) and c.sum() else (0.0, 0.0),
        "p_value_cer": permutation_pvalue(ca, cb, n_permutations=n_permutations, seed=seed, groups=groups) if len(ids) else 1.0,
        "top": [], "top_share": None, "delta_wer_without_top": None,
    }
    if d.sum() != 0:
        direction = np.sign(d.sum())
        order = [k for k in np.argsort(-direction * d, kind="stable")[:top_k] if d[k] * direction > 0]
        top_sum = float(sum(d[k] for k in order))
        rest_w = w.sum() - sum(w[k] for k in order)
        out.update(top=[ids[k] for k in order], top_share=top_sum / float(d.sum()),
                   delta_wer_without_top=ratio(float(d.sum()) - top_sum, rest_w) if rest_w else None)
    return out


def align_words(reference: str, hypothesis: str) -> list[tuple[str, str, str]]:
    """``(op, ref_word, hyp_word)`` per aligned position: op ``=`` (hit), ``S`` (substitution),
    ``D`` (deletion: no hyp word), ``I`` (insertion: no ref word); jiwer's alignment of the
    normalised texts."""
    ref, hyp = reference.split(), hypothesis.split()
    if not ref and not hyp:
        return []
    if not ref:
        return [("I", "", h) for h in hyp]
    if not hyp:
        return [("D", r, "") for r in ref]
    process = jiwer.process_words(" ".join(ref), " ".join(hyp))
    out: list[tuple[str, str, str]] = []
    for chunk in process.alignments[0]:
        rs, hs = ref[chunk.ref_start_idx:chunk.ref_end_idx], hyp[chunk.hyp_start_idx:chunk.hyp_end_idx]
        if chunk.type == "equal":
            out += [("=", r, h) for r, h in zip(rs, hs)]
        elif chunk.type == "substitute":
            out += [("S", r, h) for r, h in zip(rs, hs)]
        elif chunk.type == "delete":
            out += [("D", r, "") for r in rs]
        else:
            out += [("I", "", h) for h in hs]
    return out


def aligned_text(pairs: Sequence[tuple[str, str, str]], *, width: int = 96, labels: tuple[str, str] = ("REF", "HYP")) -> str:
    """Plain aligned text (three lines per chunk: reference, hypothesis, marks S/D/I), wrapped at
    ``width`` characters."""
    blocks, ref, hyp, mark = [], [], [], []
    pad = max(len(x) for x in labels) + 2
    used = pad

    def flush():
        if ref:
            blocks.append("\n".join([f"{labels[0]}:".ljust(pad) + " ".join(ref), f"{labels[1]}:".ljust(pad) + " ".join(hyp),
                                     " " * pad + " ".join(mark)]).rstrip())

    for op, r, h in pairs:
        r_, h_ = r or "*" * max(1, len(h)), h or "*" * max(1, len(r))
        n = max(len(r_), len(h_))
        if used + n + 1 > width and ref:
            flush()
            ref, hyp, mark, used = [], [], [], pad
        ref.append(r_.ljust(n))
        hyp.append(h_.ljust(n))
        mark.append(("" if op == "=" else op).ljust(n))
        used += n + 1
    flush()
    return "\n".join(blocks)


_CLASSES = {"=": "ok", "S": "sub", "D": "del", "I": "ins"}
_TITLES = {"=": "hit", "S": "substitution", "D": "deletion", "I": "insertion"}


def aligned_html(pairs: Sequence[tuple[str, str, str]]) -> str:
    """Inline aligned words (each position a small column: reference above hypothesis) that wrap
    like text; errors carry the classes ``sub``, ``del``, ``ins``."""
    e = html.escape
    cells = []
    for op, r, h in pairs:
        cls = _CLASSES[op]
        ref_cell = e(r) if r else "+"
        hyp_cell = e(h) if h else "—"
        cells.append(f'<span class="w {cls}" title="{_TITLES[op]}"><span class="r">{ref_cell}</span>'
                     f'<span class="h">{hyp_cell}</span></span>')
    return '<span class="align">' + " ".join(cells) + "</span>"
