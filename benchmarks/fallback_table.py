"""What Whisper's temperature fallback changes, from sweeps decoded with it
(``decode: {temperature_fallback: true}``): per run, the greedy WER (its rows' first
hypotheses, which are what the standard protocol decodes), the WER with the fallback, how many
utterances were sampled again and how many still loop, Δ against the dense model of the same
sweep under each decoding [paired 95% CI], and the fallback against greedy on the same model.

    python benchmarks/fallback_table.py SWEEP_DIR [SWEEP_DIR ...] [--standard-rows R.jsonl ...] [--markdown T.md] [--json T.json]

``--standard-rows``: rows of sweeps decoded without the fallback (``runs.jsonl`` or the reduced
files in docs/results); a run with the same model, set, plan and calibration found there has its
WER printed beside the greedy WER recomputed here, which must agree to the digit (the fallback's
first pass is the standard decoding). It decodes nothing; it rescores the first hypotheses with
the normaliser each run recorded, after checking that it gives every row's stored normalised
texts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from calibration_table import _calibration_set
from method_table import RULE_OF, _label, _level, _loops, read_sweeps


def _normalizer(model: str, name: str):
    """The normaliser a run recorded: its model's tokenizer's, or the whisper-normalizer package's."""
    from asrprune.scoring import default_normalizer

    processor = None
    if name == "transformers.WhisperTokenizer.normalize":
        from transformers import WhisperProcessor

        from asrprune.models import resolve_model_dir

        processor = WhisperProcessor.from_pretrained(resolve_model_dir(model))
    fn, got = default_normalizer(processor)
    if got != name:
        raise SystemExit(f"the run was scored with {name}; here only {got} is available")
    return fn


def greedy_rows(rows: list[dict], normalizer) -> list[dict]:
    """The rows rescored on their first (greedy) hypotheses."""
    from asrprune.scoring import score_utterance

    out = []
    for r in rows:
        if r.get("failed") or r.get("skipped"):
            out.append(r)
            continue
        if "first_hypothesis" not in r:
            raise SystemExit(f"utterance {r['id']}: no first_hypothesis (not decoded with temperature_fallback)")
        again = score_utterance(r["reference"], r["hypothesis"], normalizer)
        if again["hypothesis_norm"] != r["hypothesis_norm"] or again["reference_norm"] != r["reference_norm"]:
            raise SystemExit(f"utterance {r['id']}: this normaliser does not reproduce the run's; rescoring would be unsound")
        s = score_utterance(r["reference"], r["first_hypothesis"], normalizer)
        out.append({**r, **s, "hypothesis": r["first_hypothesis"]})
    return out


def _wer(rows: list[dict]) -> float:
    from asrprune.evidence import is_scored

    scored = [r for r in rows if is_scored(r, "skip")]
    return sum(r["substitutions"] + r["deletions"] + r["insertions"] for r in scored) / sum(r["ref_words"] for r in scored)


def _run_key(r: dict) -> tuple:
    cal = (r.get("pruning") or {}).get("calibration") or {}
    return (r["model"], r["dataset"], json.dumps(r.get("plan"), sort_keys=True), cal.get("fingerprint"))


def standard_wers(paths: list[Path]) -> dict[tuple, float]:
    """WER per (model, set, plan, calibration fingerprint) of rows decoded without the fallback."""
    out = {}
    for p in paths:
        for line in p.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get("status") != "ok" or "summary" not in r or (r.get("options") or {}).get("temperature_fallback"):
                continue
            out[_run_key(r)] = r["summary"]["wer"]
    return out


def collect(dirs: list[Path], standard: dict[tuple, float]) -> list[dict]:
    from asrprune.evidence import paired_change
    from asrprune.files import read_jsonl

    rows, baselines = read_sweeps(dirs)
    norms = {}

    def normalizer(r):
        name = json.loads((r["_dir"] / r["run_dir"] / "summary.json").read_text(encoding="utf-8"))["normalizer"]
        if (r["model"], name) not in norms:
            norms[(r["model"], name)] = _normalizer(r["model"], name)
        return norms[(r["model"], name)]

    def utts(r):
        return list(read_jsonl(r["_dir"] / r["run_dir"] / "utterances.jsonl"))

    out = []
    dense, done = {}, {}
    for key, b in sorted(baselines.items()):
        fb = utts(b)
        gr = greedy_rows(fb, normalizer(b))
        dense[key] = (fb, gr)
        out.append(_entry(b, "dense", "0%", fb, gr, None, standard.get(_run_key(b))))
    for r in sorted(rows, key=lambda r: (r["model"], r["dataset"], str(r.get("group")), _level(r), _calibration_set(r["_dir"]))):
        if r["status"] != "ok":
            out.append({"model": r["model"], "dataset": r["dataset"], "method": _label(str(r.get("group"))),
                        "level": _level(r), "status": r["status"]})
            continue
        fb = utts(r)
        gr = greedy_rows(fb, normalizer(r))
        e = _entry(r, _label(str(r.get("group"))), _level(r), fb, gr, dense.get((r["model"], r["dataset"])),
                   standard.get(_run_key(r)), paired_change)
        out.append(e)
        cal = (r.get("pruning") or {}).get("calibration") or {}
        e["calibration"] = f"{_calibration_set(r['_dir'])} ({cal.get('n_utterances', '?')})"
        done[(r["model"], r["dataset"], r.get("group"), _level(r), cal.get("fingerprint"))] = (r, e, fb)
    # an allocation rule against the same method with every matrix at the level and the same
    # calibration set, both with the fallback
    for (model, dataset, group, level, cal), (r, e, fb) in done.items():
        same = done.get((model, dataset, RULE_OF.get(group), level, cal))
        if same is not None:
            c = paired_change(same[2], fb)
            e.update(vs_uniform=c["delta_wer"], vs_uniform_ci=list(c["delta_ci"]), vs_uniform_p=c["p_value"],
                     vs_uniform_method=_label(RULE_OF[r["group"]]))
    return out


def _entry(r, method, level, fb, gr, dense, standard_wer, paired_change=None) -> dict:
    s = r["summary"]
    fallback = s.get("fallback") or {}
    e = {"model": r["model"], "dataset": r["dataset"], "method": method, "level": level, "status": "ok",
         "n": s["n_utterances"], "greedy_wer": _wer(gr), "standard_wer": standard_wer, "wer": s["wer"],
         "wer_ci": s["wer_ci"], "resampled": fallback.get("n"), "unresolved": fallback.get("unresolved"),
         "greedy_loops": _loops(gr), "loops": _loops(fb), "dir": str(r["_dir"])}
    if paired_change is not None and dense is not None:
        for name, a, b in (("greedy", dense[1], gr), ("fallback", dense[0], fb)):
            c = paired_change(a, b)
            e.update({f"delta_{name}": c["delta_wer"], f"delta_{name}_ci": list(c["delta_ci"]), f"p_{name}": c["p_value"],
                      f"delta_{name}_without_top": c["delta_wer_without_top"]})
        c = paired_change(gr, fb)
        e.update(fallback_vs_greedy=c["delta_wer"], fallback_vs_greedy_ci=list(c["delta_ci"]),
                 fallback_vs_greedy_p=c["p_value"])
    return e


def _pct(x, signed=False):
    return "" if x is None else (f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}")


def _ci(e, key):
    if key not in e:
        return ""
    lo, hi = e[f"{key}_ci"]
    return f"{_pct(e[key], True)} [{_pct(lo, True)}, {_pct(hi, True)}]"


def markdown(entries: list[dict]) -> str:
    lines = ["WER %; Δ against the dense model of the same sweep under the same decoding [paired 95% CI]; "
             "greedy = the first hypotheses (the standard protocol), fallback = after Whisper's temperature "
             "fallback; loops = hypotheses with more insertions than their reference has words; resampled = "
             "utterances whose greedy text compressed by more than 2.4 (still above after 1.0: unresolved); "
             "fallback vs greedy differs only on the resampled utterances, so with one or two of them the "
             "sign-flip p cannot fall below 0.5 (it is 1 with one)", "",
             "| model | set | method | sparsity | calibration | greedy WER (standard row) | greedy Δ | loops | fallback WER [95% CI] | "
             "fallback Δ | loops | resampled (unresolved) | fallback vs greedy, same model |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        if e["status"] != "ok":
            lines.append(f"| {e['model']} | {e['dataset']} | {e['method']} | {e['level']} | | {e['status']} | | | | | | | |")
            continue
        std = f" ({_pct(e['standard_wer'])})" if e.get("standard_wer") is not None else ""
        ci = f"{_pct(e['wer'])} [{_pct(e['wer_ci'][0])}, {_pct(e['wer_ci'][1])}]"
        vs = _ci(e, "fallback_vs_greedy")
        if vs:
            vs += f", p = {e['fallback_vs_greedy_p']:.4f}"
        lines.append(f"| {e['model']} | {e['dataset']} | {e['method']} | {e['level']} | {e.get('calibration', '')} | {_pct(e['greedy_wer'])}{std} | "
                     f"{_ci(e, 'delta_greedy')} | {e['greedy_loops']} | {ci} | {_ci(e, 'delta_fallback')} | {e['loops']} | "
                     f"{e['resampled']} ({e['unresolved']}) | {vs} |")
    rules = [e for e in entries if "vs_uniform" in e]
    if rules:
        lines += ["", "With the fallback, against the same method with every matrix at the level (paired 95% CI, permutation p):", ""]
        lines += [f"- {e['model']} {e['dataset']}, {e['method']} {e['level']} ({e['calibration']}) vs {e['vs_uniform_method']}: "
                  f"{_ci(e, 'vs_uniform')}, p = {e['vs_uniform_p']:.4f}" for e in rules]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep directories decoded with temperature_fallback")
    ap.add_argument("--standard-rows", nargs="*", type=Path, default=[], help="rows of the same runs without the fallback")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    entries = collect(args.dirs, standard_wers(args.standard_rows))
    text = markdown(entries)
    differ = [e for e in entries if e.get("standard_wer") is not None and round(e["standard_wer"], 10) != round(e["greedy_wer"], 10)]
    if differ:
        text += ("\nGreedy WER here against the standard row of the same model, set, plan and calibration "
                 "(they differ when the rows were made on another machine or thread count: docs/methods.md):\n\n")
        text += "".join(f"- {e['model']} {e['dataset']}, {e['method']} {e['level']} ({e.get('calibration', '')}): "
                        f"{_pct(e['greedy_wer'])} against {_pct(e['standard_wer'])}\n" for e in differ)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
