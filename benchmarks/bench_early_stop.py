"""The quick study with and without early stopping of collapsed variants: wall time per stage and
per run, and the table rows that differ.

    python benchmarks/bench_early_stop.py --out DIR            # tiny.en, 300 test-other, 100 LJ001 calibration

1. ``asrprune reproduce tiny.en TEST_OTHER --calibration LJ001 --preset quick`` with early stopping
   (the default) into ``DIR/early``;
2. a copy of it, rerun with ``--no-early-stop`` into ``DIR/full``: the runs that stopped early are
   completed from where they stopped (resume), everything else is already done. The study without
   early stopping therefore costs the first wall time plus this one (the stopped runs' own time
   is their partial time plus their completion), on the same machine, one after the other;
3. the rows of the two results: only collapsed rows may differ, and only by being marked
   collapsed in the first.

Interrupted, it resumes: ``DIR/bench_state.json`` keeps the wall time of each phase so far, and
each study resumes its runs (the time of a phase is then the sum over its sessions).

Nothing of the study is changed: ``--max-new-tokens`` stays at its default (444), as a new user
would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rows(d: Path) -> dict[str, dict]:
    from asrprune.files import latest_rows, read_jsonl

    return latest_rows(read_jsonl(d / "runs.jsonl"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--data", default=str(SHARED / "librispeech_test_other" / "manifest.jsonl"))
    p.add_argument("--calibration", default=str(SHARED / "ljspeech" / "manifest.jsonl") + "::LJ001-*")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--calibration-limit", type=int, default=100)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    early, full = args.out / "early", args.out / "full"
    base = [sys.executable, "-m", "asrprune", "reproduce", args.model, args.data, "--calibration", args.calibration,
            "--preset", "quick", "--limit", str(args.limit), "--calibration-limit", str(args.calibration_limit),
            "--no-progress"]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    # the wall times so far, so that an interrupted benchmark resumes (each study resumes its
    # runs) and adds the time of the rest instead of starting over
    state_path = args.out / "bench_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    args.out.mkdir(parents=True, exist_ok=True)

    def timed(phase: str, cmd: list[str]) -> float:
        if state.get(f"{phase}_done"):
            return float(state[f"{phase}_s"])
        prior, t0 = float(state.get(f"{phase}_s", 0.0)), time.perf_counter()
        proc = subprocess.Popen(cmd, env=env)
        while proc.poll() is None:  # the elapsed time written every 30 s: a killed benchmark keeps it
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                state[f"{phase}_s"] = prior + time.perf_counter() - t0
                state_path.write_text(json.dumps(state, indent=2))
        rc = proc.returncode
        state[f"{phase}_s"] = prior + time.perf_counter() - t0
        state[f"{phase}_done"] = rc == 0
        state[f"{phase}_sessions"] = int(state.get(f"{phase}_sessions", 0)) + 1
        state_path.write_text(json.dumps(state, indent=2))
        if rc != 0:
            raise SystemExit(f"{phase}: asrprune reproduce exited {rc}")
        return float(state[f"{phase}_s"])

    wall_early = timed("early", [*base, "--out", str(early)])
    if not full.exists():  # the completed study starts as a copy of the early-stopped one
        shutil.copytree(early, full)
    wall_complete = timed("complete", [*base, "--out", str(full), "--no-early-stop"])

    a, b = _rows(early), _rows(full)
    stages = json.loads((early / "study.json").read_text()).get("stages", {})
    collapsed = {k: r for k, r in a.items() if r.get("status") == "collapsed"}
    print(f"{args.model}, quick preset, {args.limit} test-other utterances, {args.calibration_limit} calibration utterances; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"with early stopping: {wall_early / 60:.1f} min; without: {(wall_early + wall_complete) / 60:.1f} min "
          f"(+{wall_complete / 60:.1f} min to complete the {len(collapsed)} stopped runs)")
    print("stages with early stopping: " + ", ".join(f"{k} {v.get('wall_s', 0):.0f} s" for k, v in stages.items()))
    print(f"{'run':58} {'status':10} {'n':>4} {'wall s (early)':>14} {'wall s (full)':>13}")
    for k, r in a.items():
        full_s = float(r.get("wall_s") or 0) + (float(b[k].get("wall_s") or 0) if k in collapsed else 0.0)
        n = (r.get("collapsed") or {}).get("n_scored") or (r.get("summary") or {}).get("n_utterances")
        print(f"{r.get('variant', k)[:58]:58} {r['status']:10} {n or 0:>4} {float(r.get('wall_s') or 0):14.0f} {full_s:13.0f}")
    differ = []
    for k in sorted(set(a) | set(b)):
        ra, rb = a.get(k, {}), b.get(k, {})
        same = (ra.get("status") == rb.get("status") and (ra.get("summary") or {}).get("wer") == (rb.get("summary") or {}).get("wer")
                and (ra.get("comparison") or {}).get("delta") == (rb.get("comparison") or {}).get("delta"))
        if not same:
            differ.append((k, ra, rb))
    print(f"rows that differ: {len(differ)} (collapsed with early stopping: {len(collapsed)})")
    for k, ra, rb in differ:
        c = ra.get("collapsed") or {}
        print(f"  {ra.get('variant')}: {ra.get('status')} after {c.get('n_scored')} utterances (interim ΔWER "
              f"{100 * float(c.get('delta', 0)):+.1f} [{100 * float((c.get('ci') or [0, 0])[0]):+.1f}, "
              f"{100 * float((c.get('ci') or [0, 0])[1]):+.1f}]) -> {rb.get('status')} WER "
              f"{100 * float((rb.get('summary') or {}).get('wer') or 0):.2f}, Δ {100 * float((rb.get('comparison') or {}).get('delta') or 0):+.2f}")
    only_collapsed = all(k in collapsed for k, _, _ in differ)
    print(f"only collapsed rows differ: {only_collapsed}")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_early_s": wall_early, "wall_complete_s": wall_complete,
                                               "stages": stages, "collapsed": collapsed, "differ": [k for k, _, _ in differ],
                                               "only_collapsed_differ": only_collapsed}, indent=2, default=str))
    return 0 if only_collapsed else 1


if __name__ == "__main__":
    raise SystemExit(main())
