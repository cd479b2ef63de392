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

import json
import logging
import math
import re
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence


from .figures import pareto_figure
from .files import atomic_write_text
from .render import Block, Image, Table, render_html, render_markdown
from .findings import (
    anatomy_blocks,
    changes,
    claims_table,
    forest_csv,
    forest_images,
    utterance_blocks,
    verdict_tables,
)
from .results import (  # the reading of result files; importable from here as before
    PAPER_NOTE,
    Study,
    _NO_CURVE_GROUPS,
    _collapsed,
    _condition_key,
    _delta_cell,
    _ok,
    _p,
    _pct,
    _signed,
    _sort_conditions,
    collapsed_cells,
    comparison,
    load_study,
    normalise_group,
    paper_set,
    paper_wer,
    significant,
)

log = logging.getLogger(__name__)

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


