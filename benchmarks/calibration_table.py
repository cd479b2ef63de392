"""Which calibration set a calibrated method is fitted to, and what that changes: the calibrated
runs of one or more sweeps (each sweep has one calibration set), per (model, evaluation set,
method, sparsity) one row per calibration set, with the WER [95% CI], Δ against dense [paired
95% CI], the loops, and Δ against the same method and sparsity calibrated on the reference set
(paired 95% CI, permutation p).

    python benchmarks/calibration_table.py SWEEP_DIR [SWEEP_DIR ...] --reference SWEEP_DIR [--reference SWEEP_DIR ...] [--markdown T.md] [--json T.json]

The reference sweeps' calibrated runs are the ones the others are compared with (one per model
and set, each one of the SWEEP_DIRs or added to them). The dense baselines of a (model, set) in the sweeps must agree
to the digit (same error counts): pairing a run with another sweep's baseline is only sound when
they are the same decoding. It decodes nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from method_table import _cell, _label, _level, _loops, _not_finished, read_sweeps


@functools.cache
def _calibration_set(sweep_dir: Path) -> str:
    """The calibration set as the sweep's spec names it: the source's folder and the id pattern."""
    import yaml

    spec = (yaml.safe_load((sweep_dir / "sweep.yaml").read_text(encoding="utf-8")) or {}).get("calibration") or {}
    source = Path(str(spec.get("source", "?"))).parent.name
    include = spec.get("include")
    return f"{source}{'::' + include if include else ''}"


def _calibration_name(sweep_dir: Path, c: dict) -> str:
    """The calibration set and the number of utterances taken from it."""
    return f"{_calibration_set(sweep_dir)} ({c.get('n_utterances', '?')})"


def _tokens_per_layer(c: dict, part: str) -> int | None:
    """Calibration tokens one layer's Hessian saw (those of the first layer's self-attention
    query; ``n_tokens`` in pruning.json sums them over the matrices)."""
    m = (c.get("modules") or {}).get(f"model.{part}.layers.0.self_attn.q_proj") or {}
    return m.get("n_tokens")


def collect(dirs: list[Path], references: list[Path]) -> list[dict]:
    from asrprune.evaluation import compare
    from asrprune.files import read_jsonl

    everything, baselines = read_sweeps(dirs)
    rows = [r for r in everything if (r.get("pruning") or {}).get("calibration")]

    def run_dir(r):
        return r["_dir"] / r["run_dir"]

    refs = {(r["model"], r["dataset"], r.get("group"), _level(r)): r
            for r in rows if r["_dir"] in references and r["status"] == "ok"}
    out = [{"model": m, "dataset": d, "method": "dense", "level": "0%", "status": "ok", "wer": b["summary"]["wer"],
            "wer_ci": b["summary"]["wer_ci"], "n": b["summary"]["n_utterances"]} for (m, d), b in sorted(baselines.items())]
    for r in sorted(rows, key=lambda r: (r["model"], r["dataset"], str(r.get("group")), _level(r), r["_dir"] not in references)):
        cal = r["pruning"]["calibration"]
        full = run_dir(r) / "pruning.json"  # the row keeps the calibration's summary; the file has every matrix
        if full.is_file():
            cal = {**json.loads(full.read_text(encoding="utf-8")).get("calibration", {}), **cal}
        e = {"model": r["model"], "dataset": r["dataset"], "method": _label(str(r.get("group"))), "level": _level(r),
             "calibration": _calibration_name(r["_dir"], cal), "decoder_tokens": _tokens_per_layer(cal, "decoder"),
             "encoder_tokens": _tokens_per_layer(cal, "encoder"), "labels": (cal.get("options") or {}).get("labels"),
             "status": r["status"], "dir": str(r["_dir"]), "reference": r["_dir"] in references}
        s = r.get("summary") or {}
        if r["status"] == "ok":
            c = r.get("comparison") or compare(run_dir(baselines[(r["model"], r["dataset"])]), run_dir(r)).to_dict()
            e.update(wer=s["wer"], wer_ci=s["wer_ci"], n=s["n_utterances"], loops=_loops(list(read_jsonl(run_dir(r) / "utterances.jsonl"))),
                     delta=c["delta_wer"], delta_ci=c["delta_ci"], p=c["p_value"],
                     delta_without_top=c.get("delta_wer_without_top"))
            ref = refs.get((r["model"], r["dataset"], r.get("group"), _level(r)))
            if ref is not None and ref is not r:
                v = compare(run_dir(ref), run_dir(r)).to_dict()
                e.update(vs_ref=v["delta_wer"], vs_ref_ci=v["delta_ci"], vs_ref_p=v["p_value"],
                         vs_ref_calibration=_calibration_name(ref["_dir"], ref["pruning"]["calibration"]))
        else:
            _not_finished(r, e)
        out.append(e)
    out.sort(key=lambda e: (e["model"], e["dataset"]))  # stable: each dense row stays first
    return out


def markdown(entries: list[dict]) -> str:
    lines = ["WER % [95% CI], Δ against dense [paired 95% CI]; loops = hypotheses with more insertions than their "
             "reference has words; Δ without the top 5: the paired Δ with the 5 utterances that add most to it left out; last column: Δ against the same method calibrated on the reference set "
             "[paired 95% CI], permutation p", "",
             "| model | set | method | sparsity | calibration (utterances) | tokens per layer (encoder / decoder) | result | Δ without the top 5 utterances | vs reference calibration |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        if e["method"] == "dense":
            lo, hi = e["wer_ci"]
            lines.append(f"| {e['model']} | {e['dataset']} | dense | 0% | | | {100 * e['wer']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] | | |")
            continue
        vs = ""
        if "vs_ref" in e:
            lo, hi = e["vs_ref_ci"]
            vs = f"{100 * e['vs_ref']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}], p = {e['vs_ref_p']:.4f}"
        elif e.get("reference"):
            vs = "(reference)"
        tokens = f"{e['encoder_tokens']} / {e['decoder_tokens']}" if e.get("decoder_tokens") else ""
        without = f"{100 * e['delta_without_top']:+.2f}" if e.get("delta_without_top") is not None else ""
        lines.append(f"| {e['model']} | {e['dataset']} | {e['method']} | {e['level']} | {e['calibration']} | "
                     f"{tokens} | {_cell(e)} | {without} | {vs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", type=Path)
    p.add_argument("--reference", type=Path, action="append", required=True,
                   help="a sweep whose calibration the others are compared with (repeat it: one per model and set)")
    p.add_argument("--markdown", type=Path, default=None, help="write the table here (also printed)")
    p.add_argument("--json", type=Path, default=None, help="write every entry here")
    args = p.parse_args(argv)
    dirs = list(dict.fromkeys([*args.sweeps, *args.reference]))
    entries = collect(dirs, args.reference)
    text = markdown(entries)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(entries, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
