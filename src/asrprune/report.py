"""Study report: ``report.md`` + a self-contained ``report.html`` from result files only.

Reads the study directory layout of docs/architecture.md ("Study directory layout"):
``study.json``, ``runs.jsonl`` and ``sensitivity/``. Needs no model and does not import torch,
so a report can be rebuilt anywhere (``asrprune report DIR``).

The report holds:

- the paper-style table per model and protocol: condition, selector, measured sparsity of all
  linear weights and of all parameters, and per data set the WER with its 95% bootstrap
  interval, the paired change against the baseline with its interval and p value, a mark for
  significant changes, and the paper's own number where it has one (the paper used
  Whisper-small, so its numbers are a reference point, not a target);
- WER-versus-sparsity curves per component group (PNG);
- the sensitivity heatmaps and, when present, the diagnostics' rank correlations;
- non-zero parameter counts per condition;
- a plain-words summary: which changes are significant (p < 0.05 *and* the 95% interval
  excludes 0) and which share of each change comes from the 5 utterances that changed most.

All numbers in the result files are fractions; the report shows WER and sparsity in percent.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .evidence import align_words, aligned_html, aligned_text, paired_change
from .figures import pareto_figure
from .files import atomic_write_text, latest_rows, read_jsonl
from .render import Block, Details, Image, Table, render_html, render_markdown

log = logging.getLogger(__name__)

ALPHA = 0.05
# The paper's LibriSpeech WER (%) for Whisper-small (see ../shared/PAPER.md), keyed by
# "<group>@<sparsity>" and the LibriSpeech split.
PAPER_WER: dict[str, dict[str, float]] = {
    "baseline": {"test-clean": 3.45, "test-other": 11.64},
    "decoder_self_attn@0.5": {"test-clean": 3.29, "test-other": 9.26},
    "late_encoder@0.5": {"test-clean": 3.31, "test-other": 9.92},
    "global@0.4": {"test-other": 61.32},
    "sensitivity_aware@0.4": {"test-other": 11.84},
}
PAPER_NOTE = (
    "Paper numbers: Irigoyen et al. 2025 (arXiv 2511.08092), Whisper-small on the full "
    "LibriSpeech splits under their protocol; the sensitivity-aware row is their 40.8% model."
)
_GROUP_ALIASES = {
    "decoder_self_attention": "decoder_self_attn",
    "dec_self_attn": "decoder_self_attn",
    "last4_encoder": "late_encoder",
    "encoder_last4": "late_encoder",
    "global_magnitude": "global",
    "sensitivity_aware": "allocated",
    "allocation": "allocated",
}
# groups whose runs are not points of one curve
_NO_CURVE_GROUPS = {"baseline", "probe", "paper_plan"}


class ReportError(ValueError):
    """The study directory cannot be read into a report."""


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


@dataclass
class Study:
    """What a study directory holds: options, runs (last row per run id) and sensitivity."""

    root: Path
    options: dict
    runs: list[dict]
    bad_lines: list[str] = field(default_factory=list)
    sensitivity: dict | None = None
    heatmaps: list[Path] = field(default_factory=list)
    plan_check: dict | None = None  # plans/plan_check.json: whole-plan calibration loss
    methods: dict | None = None  # methods.json: the method rows against dense and global magnitude
    _utterances: dict = field(default_factory=dict)

    def utterances(self, row: Mapping) -> list[dict] | None:
        """The run's ``utterances.jsonl`` rows (cached), or None when the file is not there."""
        rid = str(row.get("run_id"))
        if rid not in self._utterances:
            path = self.root / str(row.get("run_dir") or f"runs/{rid}") / "utterances.jsonl"
            self._utterances[rid] = read_jsonl(path) if path.is_file() else None
        return self._utterances[rid]

    def baseline_of(self, row: Mapping) -> dict | None:
        """The run's baseline row (by ``baseline_run_id``, else the baseline of its model,
        protocol and data set)."""
        bid = row.get("baseline_run_id") or (row.get("comparison") or {}).get("baseline_run_id")
        for r in self.runs:
            if bid and r.get("run_id") == bid:
                return r
        key = (row.get("model"), row.get("protocol"), row.get("dataset"))
        return next((r for r in self.runs if _ok(r) and normalise_group(r.get("group")) == "baseline"
                     and (r.get("model"), r.get("protocol"), r.get("dataset")) == key), None)


def read_runs(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of ``runs.jsonl``, one per ``run_id`` (:func:`asrprune.files.latest_rows`: the last
    ``ok`` row wins, else the last row; a row without ``status`` is not ``ok``).

    Returns:
        (rows in order of first appearance, descriptions of the skipped lines)
    """
    bad: list[str] = []
    rows = read_jsonl(path, errors=bad)
    keyed = [dict(r, run_id=r.get("run_id") or f"line{n}") for n, r in enumerate(rows, 1)]
    return list(latest_rows(keyed).values()), bad


def _json_file(path: Path) -> dict | None:
    """The JSON content of a result file, ``None`` when there is none.

    Raises:
        ReportError: the file is not valid JSON (named in the message).
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None


def load_study(study_dir: str | Path) -> Study:
    """Read ``study.json``, ``runs.jsonl`` and ``sensitivity/`` of a study directory.

    Raises:
        FileNotFoundError: the directory or its ``runs.jsonl`` is missing.
        ReportError: ``study.json`` or ``sensitivity.json`` is not valid JSON.
    """
    root = Path(study_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"study directory not found: {root}")
    runs_path = root / "runs.jsonl"
    if not runs_path.is_file():
        raise FileNotFoundError(
            f"{runs_path} not found: a study directory holds runs.jsonl written by "
            "`asrprune sweep` or `asrprune reproduce`"
        )
    if not (root / "study.json").is_file():
        log.warning("%s has no study.json; the report will lack the study options", root)
    options = _json_file(root / "study.json") or {}
    runs, bad = read_runs(runs_path)
    sdir = root / "sensitivity"
    heatmaps = sorted(sdir.glob("*.png")) if sdir.is_dir() else []
    sens = _json_file(sdir / "sensitivity.json")
    plan_check = _json_file(root / "plans" / "plan_check.json")
    return Study(root=root, options=options, runs=runs, bad_lines=bad, sensitivity=sens, heatmaps=heatmaps,
                 plan_check=plan_check, methods=_json_file(root / "methods.json"))


# ----------------------------------------------------------------------------------------------
# helpers on rows
# ----------------------------------------------------------------------------------------------


def _ok(row: Mapping) -> bool:
    return row.get("status") == "ok" and isinstance(row.get("summary"), Mapping)


def _collapsed(row: Mapping) -> bool:
    """Stopped early as collapsed (:mod:`asrprune.early_stop`): interim statistics, no WER."""
    return row.get("status") == "collapsed" and isinstance(row.get("collapsed"), Mapping)


def collapsed_cells(c: Mapping) -> tuple[str, str, str]:
    """(WER cell, Δ cell, p cell) of a collapsed run: never a full-set WER."""
    return (f"collapsed (stopped after {c['n_scored']} of {c['n_total']} utterances)",
            f"> +{100 * float(c['threshold']):g} (interim {_signed(float(c['delta']))} "
            f"[{_signed(float(c['ci'][0]))}, {_signed(float(c['ci'][1]))}], {100 * float(c['confidence']):g}% CI)",
            _p(c.get("p")))


def normalise_group(group: str | None) -> str:
    g = re.sub(r"[^a-z0-9]+", "_", str(group or "").lower()).strip("_")
    return _GROUP_ALIASES.get(g, g)


def paper_set(dataset: str) -> str | None:
    """The LibriSpeech split a data set name refers to (``test-other``/``test-clean``), or None."""
    d = dataset.lower().replace("_", "-")
    if "test-other" in d:
        return "test-other"
    if "test-clean" in d:
        return "test-clean"
    return None


def paper_key(row: Mapping) -> str | None:
    """The key of :data:`PAPER_WER` a run corresponds to (explicit ``paper_key`` wins)."""
    if row.get("paper_key"):
        return str(row["paper_key"])
    g = normalise_group(row.get("group"))
    t = row.get("target_sparsity")
    if g == "baseline":
        return "baseline"
    if t is None:
        return None
    t = float(t)
    if g in ("decoder_self_attn", "late_encoder") and abs(t - 0.5) < 0.011:
        return f"{g}@0.5"
    if g == "global" and abs(t - 0.4) < 0.011:
        return "global@0.4"
    if g in ("allocated", "paper_plan") and abs(t - 0.4) < 0.011:
        return "sensitivity_aware@0.4"
    return None


def paper_wer(row: Mapping) -> float | None:
    """The paper's WER (%) for this run's condition and data set, if it published one."""
    key, split = paper_key(row), paper_set(str(row.get("dataset", "")))
    if key is None or split is None:
        return None
    return PAPER_WER.get(key, {}).get(split)


def comparison(row: Mapping) -> dict | None:
    """The run's paired comparison with tolerant key names, or None."""
    c = row.get("comparison")
    if not isinstance(c, Mapping):
        return None
    delta = c.get("delta", c.get("delta_wer"))
    ci = c.get("ci", c.get("delta_ci", c.get("ci95")))
    if delta is None:
        return None
    return {
        "delta": float(delta),
        "ci": [float(ci[0]), float(ci[1])] if ci else None,
        "p": None if c.get("p", c.get("p_value")) is None else float(c.get("p", c.get("p_value"))),
        "top5_share": c.get("top5_share", c.get("top_share")),
        "without_top5": c.get("delta_wer_without_top"),
        "n": c.get("n", c.get("n_utterances")),
    }


def significant(cmp: Mapping | None, alpha: float = ALPHA) -> bool:
    """p < alpha and the 95% interval of the change excludes 0."""
    if not cmp or cmp.get("p") is None or not cmp.get("ci"):
        return False
    lo, hi = cmp["ci"]
    return cmp["p"] < alpha and (lo > 0 or hi < 0)


def _pct(x: float | None, nd: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{nd}f}"


def _signed(x: float, nd: int = 2) -> str:
    return f"{100 * x:+.{nd}f}"


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _p_eq(p: float | None) -> str:
    """``p = 0.012`` or ``p < 0.001`` for running text."""
    s = _p(p)
    return f"p {s[0]} {s[1:]}" if s.startswith("<") else f"p = {s}"


def _condition_key(row: Mapping) -> tuple:
    return (row.get("condition") or row.get("group") or "?", normalise_group(row.get("group")),
            row.get("target_sparsity"), row.get("selector"))


def _sort_conditions(keys: Iterable[tuple], first_seen: Mapping[str, int]) -> list[tuple]:
    def k(key):
        label, group, target, _sel = key
        return (group != "baseline", first_seen.get(group, 999), target if target is not None else -1, label)

    return sorted(keys, key=k)


def _datasets(study: Study) -> list[str]:
    names = list((study.options.get("datasets") or {}).keys())
    for r in study.runs:
        d = r.get("dataset")
        if d and d not in names:
            names.append(d)
    return names


# ----------------------------------------------------------------------------------------------
# building blocks (rendered to markdown and to HTML)
# ----------------------------------------------------------------------------------------------


def nonzero_table(study: Study) -> Table:
    """Non-zero parameter counts per model and condition (measured after pruning)."""
    seen: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in study.runs:
        if not _ok(r):
            continue
        key = (str(r.get("model", "?")),) + _condition_key(r)[:1]
        seen.setdefault(key, r)
    rows = []
    for (model, label), r in seen.items():
        nz, tot = r.get("nonzero_params"), r.get("total_params")
        rows.append([
            model, str(label),
            "—" if tot is None else f"{int(tot):,}",
            "—" if nz is None else f"{int(nz):,}",
            f"{_pct(r.get('sparsity_all'), 1)}",
            f"{_pct(r.get('sparsity_linear'), 1)}",
        ])
    return Table(
        ["model", "condition", "parameters", "non-zero parameters", "sparsity % (all)", "sparsity % (linear)"],
        rows,
        "Counts measured on the pruned model (zeros after pruning), not requested sparsities.",
    )


def curve_images(study: Study, out_dir: Path) -> list[Image]:
    """WER-versus-sparsity PNGs, one per component group, written to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in study.runs if _ok(r)]
    baselines = {
        (r.get("model"), r.get("protocol"), r.get("dataset")): r
        for r in ok if normalise_group(r.get("group")) == "baseline"
    }
    by_group: "OrderedDict[str, list[dict]]" = OrderedDict()
    for r in ok:
        g = normalise_group(r.get("group"))
        if g in _NO_CURVE_GROUPS or g.endswith("_2of4") or r.get("target_sparsity") is None:
            continue
        by_group.setdefault(g, []).append(r)
    images = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for g, rows in by_group.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        lines: "OrderedDict[tuple, list[dict]]" = OrderedDict()
        for r in rows:
            lines.setdefault((r.get("model"), r.get("protocol"), r.get("dataset")), []).append(r)
        for key, pts in lines.items():
            pts = sorted(pts, key=lambda r: float(r["target_sparsity"]))
            if key in baselines:
                pts = [dict(baselines[key], target_sparsity=0.0)] + pts
            xs = [100 * float(r["target_sparsity"]) for r in pts]
            ys = [100 * float(r["summary"]["wer"]) for r in pts]
            lo = [y - 100 * float((r["summary"].get("wer_ci") or [r["summary"]["wer"]] * 2)[0]) for y, r in zip(ys, pts)]
            hi = [100 * float((r["summary"].get("wer_ci") or [r["summary"]["wer"]] * 2)[1]) - y for y, r in zip(ys, pts)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=" / ".join(str(k) for k in key))
        # the paper's own points (Whisper-small), baseline included, one marker per split
        paper_pts: dict[str, set] = defaultdict(set)
        for key in lines:
            cand = list(lines[key]) + ([dict(baselines[key], target_sparsity=0.0)] if key in baselines else [])
            for r in cand:
                pw, split = paper_wer(r), paper_set(str(r.get("dataset", "")))
                if pw is not None and split:
                    paper_pts[split].add((100 * float(r["target_sparsity"]), pw))
        for split, marker in (("test-other", "x"), ("test-clean", "+")):
            if paper_pts.get(split):
                ax.scatter(*zip(*sorted(paper_pts[split])), marker=marker, s=60, color="black",
                           label=f"paper, Whisper-small, {split}", zorder=5)
        ax.set_xlabel("sparsity of the selected weights (%)")
        ax.set_ylabel("WER (%)")
        ax.set_title(f"WER versus sparsity: {g}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"wer_vs_sparsity_{re.sub(r'[^A-Za-z0-9_]+', '_', g)}.png"
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        images.append(Image(path, f"WER versus sparsity, {g}", f"WER (95% CI) versus sparsity for {g}; 0% is the baseline."))
    return images


def _delta_cell(c: Mapping | None) -> tuple[str, str]:
    if not c or c.get("delta") is None:
        return "—", "—"
    txt = _signed(float(c["delta"]))
    if c.get("ci"):
        txt += f" [{_signed(float(c['ci'][0]))}, {_signed(float(c['ci'][1]))}]"
    if significant({"p": c.get("p"), "ci": c.get("ci")}):
        txt += " *"
    return txt, _p(c.get("p"))


def method_blocks(study: Study, out_dir: Path) -> list[Block]:
    """The method comparison (``methods.json``): one table per model, protocol and data set, and
    a WER-versus-sparsity figure with one line per method."""
    rows = list((study.methods or {}).get("rows") or [])
    if not rows:
        return []
    blocks: list[Block] = []
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    keyed: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for r in rows:
        keyed.setdefault((r["model"], r["protocol"], r["dataset"]), []).append(r)
    baselines = {(r.get("model"), r.get("protocol"), r.get("dataset")): r for r in study.runs
                 if _ok(r) and normalise_group(r.get("group")) == "baseline"}
    for (model, protocol, dataset), rs in keyed.items():
        rs = sorted(rs, key=lambda r: (r.get("pattern") is not None, float(r["target_sparsity"]), order[r["method"]]))
        body = []
        for r in rs:
            level = "2:4" if r.get("pattern") else f"{100 * float(r['target_sparsity']):g}%"
            if r.get("collapsed"):
                wer, vd, pd = collapsed_cells(r["collapsed"])
                body.append([r["label"], level, _pct(r.get("sparsity_linear"), 1), wer, vd, pd, "—", "—"])
                continue
            ci = r.get("wer_ci")
            wer = _pct(r.get("wer")) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")
            vd, pd = _delta_cell(r.get("vs_dense"))
            vg, pg = _delta_cell(r.get("vs_global"))
            body.append([r["label"], level, _pct(r.get("sparsity_linear"), 1), wer, vd, pd, vg, pg])
        base = baselines.get((model, protocol, dataset))
        dense = f"; dense {_pct(base['summary']['wer'])}%" if base else ""
        blocks.append(("h3", f"Methods: {model}, {dataset}, {protocol} protocol"))
        blocks.append(Table(
            ["method", "sparsity", "measured % of linear", "WER % [95% CI]", "Δ vs dense [95% CI]", "p",
             "Δ vs global magnitude [95% CI]", "p"], body,
            f"All linear weights of encoder and decoder pruned by each method{dense}. Δ in WER points, "
            "paired bootstrap interval and permutation p over the same utterances; vs global magnitude = "
            "against global magnitude pruning at the same sparsity; * = significant."))
    blocks += _method_figures(keyed, baselines, out_dir)
    return blocks


def _method_figures(keyed: Mapping[tuple, list[dict]], baselines: Mapping, out_dir: Path) -> list[Image]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_mp: "OrderedDict[tuple, list[tuple[str, list[dict]]]]" = OrderedDict()
    for (model, protocol, dataset), rs in keyed.items():
        by_mp.setdefault((model, protocol), []).append((dataset, rs))
    images = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, ((model, protocol), sets) in enumerate(by_mp.items()):
        fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.2), dpi=100, squeeze=False)
        for ax, (dataset, rs) in zip(axes[0], sets):
            base = baselines.get((model, protocol, dataset))
            lines: "OrderedDict[str, list[dict]]" = OrderedDict()
            for r in rs:
                if r.get("wer") is None:  # collapsed: no full-set WER to draw
                    continue
                lines.setdefault(r["label"] + (" 2:4" if r.get("pattern") else ""), []).append(r)
            for label, pts in lines.items():
                pts = sorted(pts, key=lambda r: float(r["target_sparsity"]))
                xs = [100 * float(r["target_sparsity"]) for r in pts]
                ys = [100 * float(r["wer"]) for r in pts]
                if label.endswith(" 2:4"):
                    ax.scatter(xs, ys, marker="s", s=40, label=label, zorder=4)
                else:
                    if base is not None:
                        xs, ys = [0.0] + xs, [100 * float(base["summary"]["wer"])] + ys
                    ax.plot(xs, ys, marker="o", label=label)
            if base is not None:
                ax.axhline(100 * float(base["summary"]["wer"]), color="grey", ls="--", lw=1, label="dense")
            ax.set_yscale("log")
            ax.set_xlabel("sparsity of all linear weights (%)")
            ax.set_ylabel("WER (%), log scale")
            ax.set_title(f"{model}, {dataset}")
            ax.grid(True, alpha=0.3, which="both")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        name = "wer_vs_sparsity_methods.png" if i == 0 else f"wer_vs_sparsity_methods_{i}.png"
        path = out_dir / name
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        images.append(Image(path, f"WER versus sparsity per method, {model}",
                            f"WER versus sparsity of all linear weights per pruning method ({model}, {protocol} "
                            "protocol); squares: 2:4; dashed: dense."))
    return images


def structure_blocks(study: Study, out_dir: Path) -> list[Block]:
    """Where a study has structurally pruned variants (or several models): a table per data set
    of size, measured throughput and WER, with the paired comparison against the model's own
    dense baseline and against the sweep's reference model (``reference_model``, e.g. dense
    tiny.en), and the Pareto figure (WER against throughput and against parameters)."""
    ok = [r for r in study.runs if _ok(r)]
    if not any(r.get("structure") for r in ok):
        return []
    blocks: list[Block] = []
    keyed: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for r in ok:
        keyed.setdefault((r.get("protocol"), r.get("dataset")), []).append(r)
    images = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, ((protocol, dataset), rs) in enumerate(keyed.items()):
        body = []
        for r in sorted(rs, key=lambda r: (str(r.get("model")), normalise_group(r.get("group")) != "baseline")):
            st = r.get("structure") or {}
            thr = ((r["summary"].get("throughput") or {}).get("audio_seconds_per_second"))
            ci = r["summary"].get("wer_ci")
            wer = _pct(r["summary"].get("wer")) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")
            own, p_own = _delta_cell(comparison(r))
            ref = r.get("comparison_reference")
            ref_c = None if not ref else {"delta": ref.get("delta"), "ci": ref.get("ci"), "p": ref.get("p")}
            vref, p_ref = _delta_cell(ref_c)
            body.append([str(r.get("model")), str(r.get("condition") or r.get("variant")),
                         f"{int(r.get('total_params') or 0):,}",
                         "—" if not st else f"{100 * float(st.get('size_reduction', 0)):.1f}",
                         "—" if thr is None else f"{float(thr):.2f}", wer, own, p_own, vref, p_ref])
        blocks.append(("h3", f"Structure: {dataset}, {protocol} protocol"))
        blocks.append(Table(["model", "condition", "parameters", "size −%", "audio-s/s", "WER % [95% CI]",
                             "Δ vs own dense [95% CI]", "p", "Δ vs reference model [95% CI]", "p"], body,
                            "Structured variants remove neurons, heads or layers (smaller matrices). audio-s/s is "
                            "the throughput measured during the run (machine load included; "
                            "benchmarks/bench_structured.py measures speed side by side)."))
        path = out_dir / ("pareto.png" if i == 0 else f"pareto_{i}.png")
        pareto_figure([{"series": str(r.get("model")), "label": str(r.get("variant")),
                        "throughput": (r["summary"].get("throughput") or {}).get("audio_seconds_per_second") or 0,
                        "size": int(r.get("total_params") or 0) / 1e6, "wer": float(r["summary"]["wer"])} for r in rs],
                      path, title=str(dataset), size_label="parameters (millions)")
        images.append(Image(path, f"Pareto: WER against throughput and parameters, {dataset}",
                            f"WER against throughput and against parameters ({dataset}, {protocol} protocol)."))
    return blocks + images


def sensitivity_blocks(study: Study) -> list[Block]:
    """Heatmaps, the diagnostics' rank correlations with the measured ablation, and rankings."""
    blocks: list[Block] = []
    if not study.heatmaps and not study.sensitivity:
        return [("p", "No sensitivity results in this study directory.")]
    sens = study.sensitivity or {}
    corr = sens.get("correlations") or sens.get("spearman")
    rows = []
    if isinstance(corr, Mapping):  # {predictor: {rho, ci, target}} or {predictor: rho}
        corr = [dict(v, predictor=k) if isinstance(v, Mapping) else {"predictor": k, "rho": v}
                for k, v in corr.items()]
    for v in corr or []:
        if not isinstance(v, Mapping):
            continue
        rho, ci, p = v.get("rho", v.get("spearman")), v.get("ci"), v.get("p")
        sp = v.get("sparsity")
        rows.append([
            str(v.get("predictor", v.get("diagnostic", "?"))),
            str(v.get("target", v.get("against", "—"))),
            "—" if sp is None else f"{100 * float(sp):.0f}%",
            "—" if rho is None or not math.isfinite(float(rho)) else f"{float(rho):+.2f}",
            "—" if not ci or any(x is None for x in ci) else f"[{float(ci[0]):+.2f}, {float(ci[1]):+.2f}]",
            _p(None if p is None else float(p)),
            str(v.get("n", "—")),
        ])
    if rows:
        blocks.append(Table(
            ["predictor", "against", "sparsity", "Spearman rho", "bootstrap 95% CI", "p", "components"], rows,
            "Does a diagnostic rank components the way the measured ablation (calibration data) does?",
        ))
    ranking = sens.get("ranking")
    if isinstance(ranking, Mapping) and ranking:
        rrows = []
        for key, ids in ranking.items():
            if isinstance(ids, list) and ids:
                k = max(1, min(5, len(ids) // 2))  # top and bottom never overlap
                rrows.append([str(key), ", ".join(map(str, ids[:k])), ", ".join(map(str, ids[-k:][::-1]))])
        if rrows:
            blocks.append(Table(["ranking by", "most sensitive (top 5)", "least sensitive (bottom 5)"], rrows,
                                "Component rankings from sensitivity.json."))
    for path in study.heatmaps:
        blocks.append(Image(path, f"sensitivity heatmap {path.stem}", path.stem.replace("_", " ")))
    return blocks


def plan_check_table(study: Study) -> Table | None:
    """Whole-plan calibration loss next to the allocator's additive prediction."""
    pc = study.plan_check
    if not isinstance(pc, Mapping) or not isinstance(pc.get("plans"), Mapping) or not pc["plans"]:
        return None

    def num(x, fmt):
        return "—" if x is None or not math.isfinite(float(x)) else format(float(x), fmt)

    rows = []
    for name, r in pc["plans"].items():
        pred, delta = r.get("predicted_damage"), r.get("loss_delta")
        ratio = "—"
        if pred is not None and delta is not None and float(pred) > 0:
            ratio = f"{float(delta) / float(pred):.2f}x"
        rows.append([str(name), num(100 * float(r.get("sparsity_linear") or 0.0), ".1f"),
                     num(delta, "+.3f"), num(pred, ".3f"), ratio])
    caption = (
        f"Is damage additive? Mean teacher-forced loss change (nats per utterance, "
        f"{pc.get('loss_reduction', 'sum')} over tokens) of each whole plan on the "
        f"{pc.get('n_utterances', '?')} calibration utterances (baseline "
        f"{num(pc.get('baseline_loss'), '.3f')}), next to the allocator's prediction, which adds "
        "the single-component damages. A ratio far above 1 means the components interact and the "
        "allocation rests on a wrong model."
    )
    return Table(["plan", "linear sparsity %", "measured loss change", "predicted (additive)", "measured / predicted"],
                 rows, caption)


def failed_table(study: Study) -> Table | None:
    failed = [r for r in study.runs if not _ok(r) and not _collapsed(r)]
    if not failed:
        return None
    rows = [[str(r.get("run_id", "?")), str(r.get("condition") or r.get("group") or "?"),
             str(r.get("dataset", "?")), str(r.get("error") or "no summary").splitlines()[0][:200]]
            for r in failed]
    return Table(["run", "condition", "dataset", "error"], rows, "Failed runs (a rerun of the sweep retries them).")


def study_blocks(study: Study) -> list[Block]:
    o = study.options
    items = []
    if o.get("model"):
        items.append(f"model: {o['model'] if isinstance(o['model'], str) else ', '.join(map(str, o['model']))}")
    for name, d in (o.get("datasets") or {}).items():
        if isinstance(d, Mapping):
            items.append(f"data set {name}: {d.get('n_utterances', '?')} utterances from {d.get('source', '?')}")
    if o.get("calibration"):
        c = o["calibration"]
        items.append("calibration: " + (json.dumps(c) if not isinstance(c, str) else c))
    if o.get("protocols"):
        items.append("protocols: " + ", ".join(map(str, o["protocols"])))
    if o.get("limit"):
        items.append(f"limit: {o['limit']} utterances per set")
    if o.get("wall_s"):
        items.append(f"wall time: {float(o['wall_s']) / 60:.1f} min")
    if study.bad_lines:
        items.append(f"skipped unreadable lines of runs.jsonl: {'; '.join(study.bad_lines)}")
    return [("ul", items)] if items else []


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


def dataset_tables(study: Study) -> list[tuple[str, Table]]:
    """The results, one table per model, protocol and data set (so that a table fits a laptop
    window): condition, selector, sparsity, WER, ΔWER, p, and the paper's WER where it has one."""
    out = []
    keyed: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for r in study.runs:
        keyed.setdefault((str(r.get("model", "?")), str(r.get("protocol", "?")), str(r.get("dataset", "?"))), []).append(r)
    first_seen: dict[str, int] = {}
    for r in study.runs:
        first_seen.setdefault(normalise_group(r.get("group")), len(first_seen))
    for (model, protocol, dataset), rows in keyed.items():
        cells: dict[tuple, dict] = {}
        for r in rows:
            cells.setdefault(_condition_key(r), r)
        with_paper = paper_set(dataset) is not None and any(paper_wer(r) is not None for r in rows)
        headers = ["condition", "selector", "sparsity % (linear / all)", "WER % [95% CI]", "Δ WER [95% CI]", "p"]
        if with_paper:
            headers.append("paper WER %")
        body = []
        for key in _sort_conditions(cells.keys(), first_seen):
            r = cells[key]
            label, _g, _t, sel = key
            line = [str(label), str(sel or "—"), f"{_pct(r.get('sparsity_linear'), 1)} / {_pct(r.get('sparsity_all'), 1)}"]
            if _collapsed(r):
                line += list(collapsed_cells(r["collapsed"]))
            elif not _ok(r):
                line += ["failed", "—", "—"]
            else:
                s = r["summary"]
                ci = s.get("wer_ci")
                w = _pct(s.get("wer")) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")
                cmp = comparison(r)
                if cmp:
                    dtxt = _signed(cmp["delta"])
                    if cmp["ci"]:
                        dtxt += f" [{_signed(cmp['ci'][0])}, {_signed(cmp['ci'][1])}]"
                    if significant(cmp):
                        dtxt += " *"
                    line += [w, dtxt, _p(cmp["p"])]
                else:
                    line += [w, "—", "—"]
            if with_paper:
                pw = paper_wer(r)
                line.append("—" if pw is None else f"{pw:.2f}")
            body.append(line)
        caption = (f"{model}, {dataset}, {protocol} protocol. WER in percent with its 95% bootstrap interval; "
                   "Δ = pruned minus baseline (points) with the paired-bootstrap 95% interval and p; "
                   "* = significant (p < 0.05 and the interval excludes 0).")
        out.append((f"{model} — {dataset} — {protocol} protocol", Table(headers, body, caption)))
    return out


def build_blocks(study: Study, img_dir: Path, *, show: Sequence[str] = ()) -> list[Block]:
    """All report blocks in order: what a reader needs first comes first (the forest plot, the
    verdicts, the paper's claims), then the tables per data set, the error anatomy, the
    utterances behind the changes, methods, structure, curves, sizes, sensitivity."""
    items = changes(study)
    blocks: list[Block] = [("h1", "asrprune study report")]
    blocks.append(("p", f"Built {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from the result files "
                        f"in {study.root.name}/."))
    blocks.append(("toc", None))
    blocks.append(("h2", "At a glance"))
    if items:
        img_dir.mkdir(parents=True, exist_ok=True)
        forest_csv(items, img_dir / "forest.csv")
        forest = forest_images(study, items, img_dir)
        blocks += [b for b in forest if "WER" in b.alt]
    blocks += verdict_tables(study, items)
    blocks.append(("h2", "The paper's claims"))
    blocks.append(claims_table(items))
    blocks.append(("p", PAPER_NOTE))
    blocks.append(("h2", "Results"))
    for title, table in dataset_tables(study):
        blocks.append(("h3", title))
        blocks.append(table)
    ft = failed_table(study)
    if ft:
        blocks.append(("h3", "Failed runs"))
        blocks.append(ft)
    if items:
        blocks += [b for b in forest if "CER" in b.alt]
    blocks.append(("h2", "Error anatomy"))
    blocks += anatomy_blocks(study, items, img_dir)
    blocks.append(("h2", "The utterances behind the changes"))
    ub = utterance_blocks(study, items, show)
    blocks += ub if ub else [("p", "No change rests on few utterances (and none was asked for with --show).")]
    mb = method_blocks(study, img_dir)
    if mb:
        blocks.append(("h2", "Methods"))
        blocks += mb
    sb = structure_blocks(study, img_dir)
    if sb:
        blocks.append(("h2", "Structure: size, speed and WER"))
        blocks += sb
    blocks.append(("h2", "WER versus sparsity"))
    imgs = curve_images(study, img_dir)
    blocks += imgs if imgs else [("p", "No component sweep with sparsity levels in this study.")]
    blocks.append(("h2", "Non-zero parameters"))
    blocks.append(nonzero_table(study))
    blocks.append(("h2", "Sensitivity"))
    blocks += sensitivity_blocks(study)
    pct = plan_check_table(study)
    if pct is not None:
        blocks.append(("h3", "Whole plans on the calibration loss"))
        blocks.append(pct)
    blocks.append(("h2", "The study"))
    blocks += study_blocks(study) or [("p", "study.json holds no options.")]
    return blocks


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    html: Path
    images: tuple[Path, ...]


def build_report(study_dir: str | Path, *, out_dir: str | Path | None = None, show: Sequence[str] = ()) -> ReportPaths:
    """Rebuild ``report.md`` and ``report.html`` from a study directory's result files.

    Args:
        study_dir: the study directory (layout in docs/architecture.md).
        out_dir: where to write (default: ``study_dir``); PNGs and ``forest.csv`` go to
            ``<out_dir>/report/``.
        show: conditions (variant names or labels; ``all``) whose top-5 utterances are shown word
            by word even when their change does not rest on few utterances.

    Returns:
        The paths written.

    Raises:
        FileNotFoundError: the directory or its runs.jsonl is missing.
        ReportError: a result file is not valid JSON.
    """
    study = load_study(study_dir)
    out = Path(out_dir) if out_dir is not None else study.root
    out.mkdir(parents=True, exist_ok=True)
    img_dir = out / "report"
    blocks = build_blocks(study, img_dir, show=show)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, render_markdown(blocks, out))
    atomic_write_text(html_path, render_html(blocks))
    images = tuple(b.path for b in blocks if isinstance(b, Image))
    log.info("report written: %s, %s (%d images)", md_path, html_path, len(images))
    return ReportPaths(md_path, html_path, images)


