"""What a reader needs first: every condition's change against its dense baseline (WER and CER),
the forest plot and ``report/forest.csv``, the verdicts, the paper's claims with ours, the error
anatomy, and the utterances behind a concentrated change, word-aligned (torch-free).
"""

from __future__ import annotations

import html
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .evidence import align_words, aligned_html, aligned_text, paired_change
from .files import atomic_write_text
from .render import Block, Details, Image, Table
from .results import (
    Study,
    _collapsed,
    _ok,
    _signed,
    normalise_group,
    paper_set,
    significant,
)


# ----------------------------------------------------------------------------------------------
# the changes: every condition against its dense baseline (WER and CER), for the first figure
# ----------------------------------------------------------------------------------------------


@dataclass
class Change:
    """One condition on one data set against its dense baseline."""

    row: dict
    status: str  # "ok" | "collapsed"
    wer: dict | None  # {"delta", "ci", "p"} (fractions)
    cer: dict | None
    top5_share: float | None = None
    top_ids: tuple[str, ...] = ()
    source: str = "recorded"  # "recorded" (runs.jsonl) | "computed" (from the utterance files)

    @property
    def key(self) -> tuple:
        r = self.row
        return (r.get("model"), r.get("protocol"), r.get("dataset"))

    @property
    def label(self) -> str:
        return str(self.row.get("condition") or self.row.get("variant") or self.row.get("group"))


def _cmp_dict(delta, ci, p) -> dict | None:
    if delta is None:
        return None
    return {"delta": float(delta), "ci": [float(ci[0]), float(ci[1])] if ci else None,
            "p": None if p is None else float(p)}


def changes(study: Study) -> list[Change]:
    """Every non-baseline condition that finished (or collapsed), with its WER and CER change.

    The WER change is the one recorded by the sweep (``comparison``); the CER change, and the WER
    change of rows written without one, are computed from the two runs' ``utterances.jsonl``
    with the procedure of :func:`asrprune.evaluation.compare` (:func:`asrprune.evidence.paired_change`).
    """
    out = []
    for r in study.runs:
        if normalise_group(r.get("group")) == "baseline":
            continue
        if _collapsed(r):
            c = r["collapsed"]
            out.append(Change(r, "collapsed", _cmp_dict(c["delta"], c["ci"], c.get("p")), None))
            continue
        if not _ok(r):
            continue
        rec = r.get("comparison") or {}
        wer = _cmp_dict(rec.get("delta", rec.get("delta_wer")), rec.get("ci", rec.get("delta_ci")),
                        rec.get("p", rec.get("p_value"))) if rec else None
        cer = _cmp_dict(rec.get("delta_cer"), rec.get("delta_cer_ci"), rec.get("p_value_cer")) if rec else None
        share = rec.get("top5_share", rec.get("top_share")) if rec else None
        top = tuple(t["id"] for t in rec.get("top") or [] if isinstance(t, Mapping) and "id" in t)
        source = "recorded"
        if wer is None or cer is None or not top:
            base = study.baseline_of(r)
            ra, rb = (study.utterances(base) if base else None), study.utterances(r)
            if ra and rb:
                pc = paired_change(ra, rb)
                if wer is None:
                    wer, share, source = _cmp_dict(pc["delta_wer"], pc["delta_ci"], pc["p_value"]), pc["top_share"], "computed"
                if cer is None:
                    cer = _cmp_dict(pc["delta_cer"], pc["delta_cer_ci"], pc["p_value_cer"])
                top = top or tuple(pc["top"])
        if wer is None:
            continue
        out.append(Change(r, "ok", wer, cer, None if share is None else float(share), top, source))
    return out


def forest_csv(items: Sequence[Change], path: Path) -> Path:
    """``report/forest.csv``: one line per condition, data set and metric."""
    lines = ["model,protocol,dataset,condition,variant,run_id,status,metric,delta,ci_low,ci_high,p,significant,source"]
    for c in items:
        for metric, d in (("wer", c.wer), ("cer", c.cer)):
            if d is None:
                continue
            lo, hi = (d["ci"] or [None, None])
            cells = [c.row.get("model"), c.row.get("protocol"), c.row.get("dataset"), c.label, c.row.get("variant"),
                     c.row.get("run_id"), c.status, metric, d["delta"], lo, hi, d["p"],
                     c.status == "ok" and significant(d), c.source if metric == "wer" else "computed"
                     if c.cer is not None and c.source == "computed" else c.source]
            lines.append(",".join(_csv_cell(x) for x in cells))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _csv_cell(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x)
    text = str(x)
    return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\n') else text


def forest_images(study: Study, items: Sequence[Change], out_dir: Path) -> list[Image]:
    """The report's first figure: ΔWER (and ΔCER) of every condition against its dense
    baseline with the paired 95% interval, one panel per data set, the zero line, significant
    changes filled (red worse, blue better), collapsed runs as a triangle at their interim
    lower bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    by_mp: "OrderedDict[tuple, list[Change]]" = OrderedDict()
    for c in items:
        by_mp.setdefault((c.row.get("model"), c.row.get("protocol")), []).append(c)
    images = []
    for i, ((model, protocol), cs) in enumerate(by_mp.items()):
        datasets = list(dict.fromkeys(c.row.get("dataset") for c in cs))
        labels = list(dict.fromkeys(c.label for c in cs))
        for metric in ("wer", "cer"):
            if not any(getattr(c, metric) for c in cs):
                continue
            height = 1.2 + 0.24 * len(labels)
            fig, axes = plt.subplots(1, len(datasets), figsize=(min(12.5, 3.2 + 3.1 * len(datasets)), height), dpi=100,
                                     squeeze=False, sharey=True)
            for ax, ds in zip(axes[0], datasets):
                ax.axvline(0, color="black", lw=0.8)
                for c in (c for c in cs if c.row.get("dataset") == ds):
                    d = getattr(c, metric)
                    if d is None:
                        continue
                    y = labels.index(c.label)
                    x = 100 * d["delta"]
                    lo, hi = ((100 * d["ci"][0], 100 * d["ci"][1]) if d["ci"] else (x, x))
                    if c.status == "collapsed":
                        ax.plot([lo], [y], marker=">", color="darkred", ms=7, ls="none")
                        continue
                    sig = significant(d)
                    color = ("tab:red" if x > 0 else "tab:blue") if sig else "grey"
                    ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt="o", color=color, ms=4, capsize=2,
                                mfc=color if sig else "white", lw=1)
                ax.set_xscale("symlog", linthresh=2.0)
                ax.set_title(str(ds), fontsize=9)
                ax.set_xlabel(f"Δ{metric.upper()} vs dense (points, symlog)", fontsize=8)
                ax.grid(True, axis="x", alpha=0.3)
                ax.tick_params(axis="x", labelsize=7)
            axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
            axes[0][0].invert_yaxis()
            fig.suptitle(f"{model}, {protocol} protocol: Δ{metric.upper()} [95% CI]", fontsize=9)
            fig.tight_layout()
            name = f"forest_{metric}.png" if i == 0 else f"forest_{metric}_{i}.png"
            path = out_dir / name
            fig.savefig(path, metadata={"Software": None})
            plt.close(fig)
            images.append(Image(path, f"Forest plot of Δ{metric.upper()}, {model}, {protocol} protocol",
                                f"Δ{metric.upper()} of every condition against the dense baseline on the same "
                                "utterances, paired bootstrap 95% interval; filled = significant (p < 0.05 and the "
                                "interval excludes 0; red worse, blue better); ▶ = collapsed, at the interim lower "
                                "bound. Data: report/forest.csv."))
    return images


def verdict_tables(study: Study, items: Sequence[Change]) -> list[Block]:
    """The summary as verdicts: one short line per condition, one column per data set."""
    blocks: list[Block] = []
    ok = [r for r in study.runs if _ok(r)]
    n_failed = len([r for r in study.runs if not _ok(r) and not _collapsed(r)])
    n_coll = len([r for r in study.runs if _collapsed(r)])
    blocks.append(("p", f"{len(study.runs)} runs recorded: {len(ok)} finished, {n_coll} stopped early as collapsed, "
                        f"{n_failed} failed."))
    by_mp: "OrderedDict[tuple, list[Change]]" = OrderedDict()
    for c in items:
        by_mp.setdefault((c.row.get("model"), c.row.get("protocol")), []).append(c)
    for (model, protocol), cs in by_mp.items():
        datasets = list(dict.fromkeys(c.row.get("dataset") for c in cs))
        labels = list(dict.fromkeys(c.label for c in cs))
        body = []
        for label in labels:
            line = [label]
            note = []
            for ds in datasets:
                c = next((c for c in cs if c.label == label and c.row.get("dataset") == ds), None)
                if c is None:
                    line.append("—")
                    continue
                d = c.wer
                if c.status == "collapsed":
                    line.append(f"collapsed, > +{100 * float(c.row['collapsed']['threshold']):g}")
                    continue
                if significant(d):
                    line.append(f"{'worse' if d['delta'] > 0 else 'better'} {_signed(d['delta'])} *")
                    if c.top5_share is not None and float(c.top5_share) > 0.5:
                        note.append(f"{ds}: {100 * float(c.top5_share):.0f}% from 5 utterances")
                else:
                    line.append(f"no change {_signed(d['delta'])}")
            line.append("; ".join(note) or "—")
            body.append(line)
        blocks.append(Table(["condition", *[str(d) for d in datasets], "rests on few utterances"], body,
                            f"{model}, {protocol} protocol: ΔWER in points against the dense baseline; * = significant "
                            "(p < 0.05 and the 95% interval excludes 0). A change that rests on few utterances is "
                            "shown word by word under \"The utterances behind the changes\"."))
    if not by_mp:
        blocks.append(("p", "No run has a comparison with its baseline yet."))
    return blocks


# The paper's claims (Whisper-small, LibriSpeech test-other unless said): key, claim, paper Δ
# (points; None where the paper gives a direction only), the direction, how our rows match it.
CLAIMS: tuple[tuple[str, str, float | None, int, Callable[[Mapping], bool]], ...] = (
    ("dsa50", "decoder self-attention 50% improves WER", -2.38, -1,
     lambda r: normalise_group(r.get("group")) == "decoder_self_attn" and _at(r, 0.5)),
    ("late50", "last encoder layers 50% improve WER", -1.72, -1,
     lambda r: normalise_group(r.get("group")) == "late_encoder" and _at(r, 0.5)),
    ("ffn", "decoder FFN is fragile: beyond 30% it collapses", None, +1,
     lambda r: normalise_group(r.get("group")) == "decoder_ffn" and (r.get("target_sparsity") or 0) > 0.3 + 1e-9),
    ("biases", "biases are fragile: +7.53 at 10%", 7.53, +1,
     lambda r: r.get("selector") == "biases" and _at(r, 0.1)),
    ("early_decoder", "early decoder layers are fragile: +67.5 at 50%", 67.5, +1,
     lambda r: r.get("selector") == "early_decoder" and _at(r, 0.5)),
    ("global40", "global magnitude 40% collapses", 49.68, +1,
     lambda r: normalise_group(r.get("group")) == "global" and _at(r, 0.4)),
    ("plan408", "the sensitivity-aware 40.8% plan stays within noise", 0.20, 0,
     lambda r: normalise_group(r.get("group")) == "paper_plan"),
)


def _at(row: Mapping, s: float) -> bool:
    return row.get("target_sparsity") is not None and abs(float(row["target_sparsity"]) - s) < 0.011


def claim_verdict(ours: Mapping, paper_delta: float | None, direction: int) -> str:
    """``reproduced``: our interval excludes 0 in the paper's direction; ``opposite``: it excludes
    0 the other way; ``not reproduced``: it includes 0 but not the paper's Δ; ``inconclusive``: it
    includes both (or the paper gives a direction only and ours includes 0). A claim of no change
    (``direction`` 0) is reproduced when our interval includes 0, else not reproduced."""
    lo, hi = ours["ci"]
    if direction == 0:  # a claim of no change: ours must include 0
        return "reproduced" if lo <= 0 <= hi else "not reproduced"
    if (direction > 0 and lo > 0) or (direction < 0 and hi < 0):
        return "reproduced"
    if (direction > 0 and hi < 0) or (direction < 0 and lo > 0):
        return "opposite"
    if paper_delta is not None and not lo <= paper_delta / 100 <= hi:
        return "not reproduced"
    return "inconclusive"


def claims_table(items: Sequence[Change]) -> Table:
    """The paper's claims, each with our measurement (model, data set, ΔWER [95% CI]) and a verdict."""
    rows = []
    libri = [c for c in items if paper_set(str(c.row.get("dataset", ""))) == "test-other"]
    pool = libri or list(items)
    for _key, claim, pdelta, direction, match in CLAIMS:
        mine = [c for c in pool if match(c.row)]
        paper = "—" if pdelta is None else f"{pdelta:+.2f}"
        if not mine:
            rows.append([claim, paper, "not in this study", "—", "—"])
            continue
        for c in mine:
            d = c.wer
            if c.status == "collapsed":
                ours = f"> +{100 * float(c.row['collapsed']['threshold']):g} (collapsed)"
                verdict = "reproduced" if direction > 0 else "opposite" if direction < 0 else "not reproduced"
            else:
                ours = f"{_signed(d['delta'])} [{_signed(d['ci'][0])}, {_signed(d['ci'][1])}]"
                verdict = claim_verdict(d, pdelta, direction)
            rows.append([claim, paper, ours, f"{c.row.get('model')}, {c.row.get('dataset')}, {c.label}", verdict])
    return Table(["claim", "paper Δ (Whisper-small, test-other)", "ours Δ [95% CI]", "measured on", "verdict"], rows,
                 "The paper's claims against ours (ΔWER in points; ours on the models and sets of this study). "
                 "reproduced: our interval excludes 0 in the paper's direction; opposite: it excludes 0 the other way; "
                 "not reproduced: it includes 0 but not the paper's Δ; inconclusive: it includes both; a claim of no "
                 "change is reproduced when our interval includes 0.")


def anatomy_blocks(study: Study, items: Sequence[Change], out_dir: Path) -> list[Block]:
    """Substitutions, deletions and insertions per 100 reference words for every condition and
    its baseline, the outputs flagged as hallucination or repetition, the share of the change
    carried by the top-5 utterances; a table and a stacked bar per model, protocol and set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks: list[Block] = []
    share = {c.row.get("run_id"): c.top5_share for c in items}
    keyed: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for r in study.runs:
        if _ok(r) and isinstance((r.get("summary") or {}).get("counts"), Mapping):
            keyed.setdefault((r.get("model"), r.get("protocol"), r.get("dataset")), []).append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, ((model, protocol, dataset), rs) in enumerate(keyed.items()):
        body, bars = [], []
        for r in rs:
            c = r["summary"]["counts"]
            w = max(int(c.get("ref_words") or 0), 1)
            sdi = [100 * int(c.get(k) or 0) / w for k in ("substitutions", "deletions", "insertions")]
            flags = r["summary"].get("n_hallucination")
            sh = share.get(r.get("run_id"))
            body.append([str(r.get("condition") or r.get("variant")), *(f"{x:.2f}" for x in sdi),
                         "—" if flags is None else str(flags), "—" if sh is None else f"{100 * float(sh):.0f}%"])
            bars.append((str(r.get("condition") or r.get("variant")), sdi))
        blocks.append(("h3", f"Error anatomy: {model}, {dataset}, {protocol} protocol"))
        blocks.append(Table(["condition", "substitutions /100 words", "deletions /100 words", "insertions /100 words",
                             "hallucination or repetition flags", "top-5 share of the change"], body,
                            "Error types per 100 reference words (their sum is the WER in points); flags: outputs "
                            "flagged as hallucination or repetition loop; top-5 share: the part of the WER change "
                            "that the 5 utterances that changed most carry."))
        fig, ax = plt.subplots(figsize=(9, 1.0 + 0.24 * len(bars)), dpi=100)
        left = np.zeros(len(bars))
        for k, (name, color) in enumerate((("substitutions", "tab:orange"), ("deletions", "tab:purple"),
                                           ("insertions", "tab:green"))):
            vals = np.array([b[1][k] for b in bars])
            ax.barh(range(len(bars)), vals, left=left, color=color, label=name)
            left += vals
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("errors per 100 reference words (symlog)", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{model}, {dataset}", fontsize=9)
        fig.tight_layout()
        path = out_dir / ("anatomy.png" if i == 0 else f"anatomy_{i}.png")
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        blocks.append(Image(path, f"Error anatomy, {model}, {dataset}", "Substitutions, deletions and insertions per "
                            "100 reference words, stacked (the bar's length is the WER in points)."))
    return blocks


def _flagged(c: Change) -> bool:
    return c.status == "ok" and significant(c.wer) and c.top5_share is not None and float(c.top5_share) > 0.5


_MAX_ALIGNED = 80  # aligned positions shown per hypothesis (a loop to the token cap is cut, with a count)


def utterance_blocks(study: Study, items: Sequence[Change], show: Sequence[str] = ()) -> list[Block]:
    """For each change that rests on few utterances (significant, top-5 share above one half) and
    each condition named in ``show`` (``all``: every one), its top-5 utterances: reference, dense
    hypothesis, pruned hypothesis, each hypothesis word-aligned to the reference with its errors
    marked (:func:`asrprune.evidence.align_words`)."""
    e = html.escape
    out: list[Block] = []
    for c in items:
        wanted = _flagged(c) or "all" in show or c.row.get("variant") in show or c.label in show
        if not wanted or c.status != "ok" or not c.top_ids:
            continue
        base = study.baseline_of(c.row)
        ra, rb = (study.utterances(base) if base else None), study.utterances(c.row)
        if not ra or not rb:
            continue
        a, b = {r["id"]: r for r in ra}, {r["id"]: r for r in rb}
        texts, parts = [], []
        for uid in c.top_ids:
            if uid not in a or uid not in b:
                continue
            ref = a[uid].get("reference_norm") or ""
            dense, pruned = a[uid].get("hypothesis_norm") or "", b[uid].get("hypothesis_norm") or ""
            pa, pb = align_words(ref, dense), align_words(ref, pruned)
            de = sum(op != "=" for op, _, _ in pa)
            pe = sum(op != "=" for op, _, _ in pb)
            more = lambda pairs: "" if len(pairs) <= _MAX_ALIGNED else f" … {len(pairs) - _MAX_ALIGNED} more positions"  # noqa: E731
            texts.append(f"{uid}: {de} errors dense, {pe} pruned ({pe - de:+d})\n"
                         + aligned_text(pa[:_MAX_ALIGNED], labels=("REF", "DENSE")) + more(pa) + "\n"
                         + aligned_text(pb[:_MAX_ALIGNED], labels=("REF", "PRUNED")) + more(pb))
            parts.append(f'<div class="utt"><p class="uid"><b>{e(uid)}</b>: {de} errors dense, {pe} pruned ({pe - de:+d})</p>'
                         f'<p class="lbl">dense</p>{aligned_html(pa[:_MAX_ALIGNED])}{e(more(pa))}'
                         f'<p class="lbl">pruned</p>{aligned_html(pb[:_MAX_ALIGNED])}{e(more(pb))}</div>')
        if not parts:
            continue
        why = "rests on few utterances" if _flagged(c) else "on request"
        title = (f"{c.label}, {c.row.get('dataset')} ({c.row.get('model')}): ΔWER {_signed(c.wer['delta'])}, "
                 f"{len(parts)} utterances that carry it ({why})")
        out.append(Details(title, "\n\n".join(texts), "".join(parts)))
    return out
