"""The method x sparsity table of one or more sweeps: per model, one row per (method, sparsity),
one column per evaluation set, each cell the WER [95% CI] and Δ against the dense model with the
paired 95% interval; below, Δ against global magnitude at the same sparsity, and for an
allocation rule (OWL, the measured allocation, the authors' rule) against the same method with
every matrix at the level, where those rows exist and finished.

    python benchmarks/method_table.py SWEEP_DIR [SWEEP_DIR ...] [--markdown T.md] [--json T.json] [--figure F.png]

Runs of several sweep directories are read together. The dense baseline of a (model, set) may
appear in several of them; they must agree to the digit (same error counts), else the table
refuses, naming the directories: pairing a run with another sweep's baseline is only sound when
the two baselines are the same decoding. A collapsed run (stopped early) shows its interim Δ and
99% interval over the utterances it scored; a failed run shows its error. It decodes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHOD_LABELS = {
    "global": "global magnitude",
    "uniform": "uniform magnitude (per matrix)",
    "authors_rule": "authors' rule (magnitude)",
    "wanda_uniform": "Wanda, per row",
    "wanda_owl": "Wanda + OWL",
    "sparsegpt_uniform": "SparseGPT",
    "sparsegpt_measured": "SparseGPT + measured allocation",
}

# an allocation rule's row, and the same method with every matrix at the level
RULE_OF = {"wanda_owl": "wanda_uniform", "sparsegpt_measured": "sparsegpt_uniform", "authors_rule": "uniform"}


def _label(group: str) -> str:
    nm = group.endswith("_2of4")
    base = METHOD_LABELS.get(group.removesuffix("_2of4"), group.removesuffix("_2of4"))
    return f"{base}, 2:4" if nm else base


def _level(row: dict) -> str:
    return "2:4" if str(row.get("group", "")).endswith("_2of4") else f"{100 * float(row['target_sparsity']):g}%"


def _loops(us: list[dict]) -> int:
    from loop_share import _loops as loop_ids  # one definition of a loop, beside this script

    return len(loop_ids({u["id"]: u for u in us}))


def read_sweeps(dirs: list[Path]) -> tuple[list[dict], dict]:
    """The latest row per run id of each sweep directory (``_dir`` added): the pruned runs, and
    the dense run per (model, set), which must have the same error counts in every directory
    (pairing a run with another sweep's dense run is only sound when they are the same decoding).
    A run id met again in a later directory (a sweep resumed from a copy of another) is the same
    run and is counted once: from the first directory where it finished, else the first one."""
    from asrprune.files import latest_rows, read_jsonl

    rows, baselines = {}, {}
    for d in dirs:
        if not (d / "runs.jsonl").is_file():
            raise SystemExit(f"{d}: no runs.jsonl (not a sweep directory)")
        for run_id, r in latest_rows(read_jsonl(d / "runs.jsonl")).items():
            r = {**r, "_dir": d}
            if r.get("variant") == "baseline":
                if r.get("status") != "ok":
                    continue
                key = (r["model"], r["dataset"])
                old = baselines.get(key)
                counts = (r["summary"] or {}).get("counts")
                if old is not None and (old["summary"] or {}).get("counts") != counts:
                    raise SystemExit(f"dense {key[0]} on {key[1]}: the baselines in {old['_dir']} and {d} differ "
                                     f"(WER {100 * old['summary']['wer']:.2f} vs {100 * r['summary']['wer']:.2f}); "
                                     "pair runs within one sweep instead")
                baselines.setdefault(key, r)
            elif run_id not in rows or (r.get("status") == "ok" and rows[run_id].get("status") != "ok"):
                rows[run_id] = r
    return list(rows.values()), baselines


def _not_finished(r: dict, e: dict) -> None:
    """A run without a WER: a collapsed one keeps its early stop's interim statistics, a failed
    one its error."""
    if r["status"] == "collapsed":
        c = (r.get("summary") or {}).get("collapsed") or {}
        e.update(n=c.get("n_scored"), delta=c.get("delta"), delta_ci99=c.get("ci"), p=c.get("p"))
    else:
        e["error"] = r.get("error")


def collect(dirs: list[Path]) -> list[dict]:
    """Every run's row (the latest per run id and directory) with its comparisons."""
    from asrprune.evaluation import compare
    from asrprune.files import read_jsonl

    rows, baselines = read_sweeps(dirs)

    def utt(r):
        return list(read_jsonl(r["_dir"] / r["run_dir"] / "utterances.jsonl"))

    def paired(a, b):  # the sweep's own comparison (evaluation.compare), on any two runs
        return compare(a["_dir"] / a["run_dir"], b["_dir"] / b["run_dir"]).to_dict()

    ok = {(r["model"], r["dataset"], r.get("group"), _level(r)): r for r in rows if r["status"] == "ok"}
    out = []
    for key, b in sorted(baselines.items()):
        s = b["summary"]
        out.append({"model": key[0], "dataset": key[1], "method": "dense", "level": "0%", "status": "ok",
                    "wer": s["wer"], "wer_ci": s["wer_ci"], "n": s["n_utterances"], "loops": _loops(utt(b)),
                    "wall_s": b.get("wall_s"), "dir": str(b["_dir"])})
    for r in sorted(rows, key=lambda r: (r["model"], r["dataset"], str(r.get("group")), _level(r))):
        e = {"model": r["model"], "dataset": r["dataset"], "method": _label(str(r.get("group") or r["variant"])),
             "group": r.get("group"), "level": _level(r), "status": r["status"], "variant": r["variant"],
             "sparsity_linear": r.get("sparsity_linear"), "wall_s": r.get("wall_s"), "dir": str(r["_dir"])}
        s = r.get("summary") or {}
        b = baselines.get((r["model"], r["dataset"]))
        if r["status"] == "ok":
            us = utt(r)
            e.update(wer=s["wer"], wer_ci=s["wer_ci"], n=s["n_utterances"], loops=_loops(us))
            if b is not None:
                # the row's own comparison when its sweep's baseline is this one (same counts, checked above)
                c = r.get("comparison") or paired(b, r)
                e.update(delta=c["delta_wer"], delta_ci=c["delta_ci"], p=c["p_value"])
            for name, group in (("global", "global"), ("uniform", RULE_OF.get(r.get("group")))):
                g = ok.get((r["model"], r["dataset"], group, _level(r)))
                if g is not None and g is not r:
                    c = paired(g, r)
                    e.update({f"vs_{name}": c["delta_wer"], f"vs_{name}_ci": c["delta_ci"],
                              f"vs_{name}_p": c["p_value"], f"vs_{name}_method": _label(group)})
        else:
            _not_finished(r, e)
        out.append(e)
    return out


def _cell(e: dict | None) -> str:
    if e is None:
        return ""
    if e["status"] == "collapsed":
        lo, hi = e["delta_ci99"]
        return f"collapsed after {e['n']}: {100 * e['delta']:+.2f} (99% [{100 * lo:+.2f}, {100 * hi:+.2f}])"
    if e["status"] != "ok":
        return f"{e['status']}: {e.get('error')}"
    lo, hi = e["wer_ci"]
    text = f"{100 * e['wer']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
    if "delta" in e:
        text += f", {100 * e['delta']:+.2f} [{100 * e['delta_ci'][0]:+.2f}, {100 * e['delta_ci'][1]:+.2f}]"
    if e.get("loops"):
        text += f", {e['loops']} loop{'s' if e['loops'] > 1 else ''}"
    return text


def _level_key(level: str) -> tuple:
    return (1, 0.0) if level == "2:4" else (0, float(level.rstrip("%")))


def markdown(entries: list[dict]) -> str:
    order = ["dense", *[_label(g) for g in METHOD_LABELS], *[_label(g + "_2of4") for g in METHOD_LABELS]]
    lines = []
    for model in sorted({e["model"] for e in entries}):
        es = [e for e in entries if e["model"] == model]
        sets = sorted({e["dataset"] for e in es})
        lines += [f"### {model}", "",
                  "WER % [95% CI], Δ against dense [paired 95% CI]; loops = hypotheses with more insertions "
                  "than their reference has words", "",
                  "| method | sparsity | " + " | ".join(sets) + " |", "| --- | --- |" + " --- |" * len(sets)]
        keys = sorted({(e["method"], e["level"]) for e in es},
                      key=lambda k: (order.index(k[0]) if k[0] in order else len(order), _level_key(k[1])))
        for method, level in keys:
            cells = [_cell(next((e for e in es if (e["method"], e["level"], e["dataset"]) == (method, level, d)), None))
                     for d in sets]
            lines.append(f"| {method} | {level} | " + " | ".join(cells) + " |")
        for name, title in (("global", "global magnitude at the same sparsity"),
                            ("uniform", "the same method with every matrix at the level (allocation rules)")):
            vs = [e for e in es if f"vs_{name}" in e]
            if vs:
                lines += ["", f"Against {title} (paired 95% CI, permutation p):", ""]
                for e in vs:
                    lo, hi = e[f"vs_{name}_ci"]
                    lines.append(f"- {e['dataset']}, {e['method']} {e['level']} vs {e[f'vs_{name}_method']}: "
                                 f"{100 * e[f'vs_{name}']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}], "
                                 f"p = {e[f'vs_{name}_p']:.4f}")
        lines.append("")
    return "\n".join(lines)


def figure(entries: list[dict], path: Path) -> None:
    """WER against sparsity per method, one panel per (model, set), one colour per method in
    every panel; a collapsed run is drawn at dense + its interim Δ with an open marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = sorted({e["model"] for e in entries})
    sets = sorted({e["dataset"] for e in entries})
    methods = [m for m in (_label(g) for g in METHOD_LABELS)
               if any(e["method"] == m and e["level"] != "2:4" for e in entries)]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(models), len(sets), figsize=(4.2 * len(sets), 3.4 * len(models)), squeeze=False)
    for ax_row, model in zip(axes, models):
        for ax, ds in zip(ax_row, sets):
            es = [e for e in entries if (e["model"], e["dataset"]) == (model, ds)]
            dense = next((e for e in es if e["method"] == "dense"), None)
            for method in methods:
                pts = sorted((float(e["level"].rstrip("%")), e) for e in es if e["method"] == method and e["level"] != "2:4")
                ok = [(x, 100 * e["wer"]) for x, e in pts if e["status"] == "ok"]
                stopped = [(x, 100 * (dense["wer"] + e["delta"])) for x, e in pts
                           if e["status"] == "collapsed" and dense is not None]
                if ok:
                    ax.plot(*zip(*ok), "o-", color=colours[method])
                if stopped:
                    ax.plot(*zip(*stopped), "o", mfc="none", color=colours[method])
            if dense is not None:
                ax.axhline(100 * dense["wer"], color="k", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlim(25, 55)
            ax.set_xticks([30, 40, 50])
            ax.set_title(f"{model}, {ds}", fontsize=10)
            ax.set_xlabel("sparsity of linear weights %")
            ax.set_ylabel("WER %")
    handles = [plt.Line2D([], [], color=colours[m], marker="o", label=m) for m in methods]
    handles += [plt.Line2D([], [], color="k", lw=0.8, ls="--", label="dense"),
                plt.Line2D([], [], color="grey", marker="o", mfc="none", ls="none", label="collapsed (interim)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.1 if len(models) > 1 else 0.16, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", type=Path)
    p.add_argument("--markdown", type=Path, default=None, help="write the tables here (also printed)")
    p.add_argument("--json", type=Path, default=None, help="write every entry here")
    p.add_argument("--figure", type=Path, default=None, help="WER against sparsity per method (PNG)")
    args = p.parse_args(argv)
    entries = collect(args.sweeps)
    text = markdown(entries)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(entries, indent=1, default=str) + "\n", encoding="utf-8")
    if args.figure:
        figure(entries, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
