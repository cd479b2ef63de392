"""The same sweep run locally and through Ray on this machine: wall times and the overhead per run.

    python benchmarks/bench_ray.py                          # tiny.en, 20 test-other utterances, 8 runs
    python benchmarks/bench_ray.py --limit 40 --workers 2 --worker-cpus 1

The local executor runs the runs one after another in this process with ``--threads`` torch
threads; the Ray executor starts ``--workers`` actors with ``--worker-cpus`` CPUs (torch
threads) each. Both write the same rows (the test suite checks that). Printed: wall time of
each, the sum of the runs' own wall times (``wall_s`` of each row, measured where the run ran),
and the overhead per run under Ray (driver wall time x workers - the runs' own time, divided by
the runs: dispatch, shipping payloads and files, the driver's writes and comparisons, actor
start-up). On a GPU machine run one worker per GPU (``--worker-gpus 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--data", default=str(SHARED / "librispeech_test_other" / "manifest.jsonl"))
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-cpus", type=float, default=1)
    p.add_argument("--worker-gpus", type=float, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the local run")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from asrprune.executor import RayExecutor
    from asrprune.files import latest_rows, read_jsonl
    from asrprune.sweep import SweepSpec, run_sweep

    torch.set_num_threads(args.threads)
    plans = [{"name": f"dsa{s}", "plan": f"decoder.self_attn={s}"} for s in (0.1, 0.2, 0.3)]
    plans += [{"name": f"ffn{s}", "plan": f"decoder.ffn={s}"} for s in (0.1, 0.2)]
    plans += [{"name": "mag20", "plan": "all_linear=0.2@matrix"}, {"name": "enc20", "plan": "encoder.ffn=0.2"}]
    spec = SweepSpec.from_dict({"models": [args.model], "data": [{"source": args.data, "limit": args.limit}],
                                "plans": plans, "decode": {"device": "cuda" if args.worker_gpus else "cpu"},
                                "early_stop": False})
    root = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    results = {}
    for name in ("local", "ray"):
        out = root / name
        ex = None
        if name == "ray":
            ex = RayExecutor(workers=args.workers, num_cpus=args.worker_cpus, num_gpus=args.worker_gpus)
            ex.actors(args.workers)  # started before the clock: a cluster keeps its workers
        t0 = time.perf_counter()
        run_sweep(spec, out, progress=False, executor=ex)
        wall = time.perf_counter() - t0
        rows = list(latest_rows(read_jsonl(out / "runs.jsonl")).values())
        own = sum(float(r["wall_s"]) for r in rows)
        results[name] = {"wall_s": wall, "runs": len(rows), "runs_own_s": own,
                         "wer": {r["variant"]: r["summary"]["wer"] for r in rows}}
        if ex is not None:
            ex.shutdown()
    r = results["ray"]
    r["overhead_per_run_s"] = (r["wall_s"] * args.workers - r["runs_own_s"]) / r["runs"]
    same = results["local"]["wer"] == results["ray"]["wer"]
    print(f"{args.model}, {args.limit} utterances, {results['local']['runs']} runs; local: {args.threads} threads; "
          f"ray: {args.workers} workers x {args.worker_cpus:g} CPU; load average {os.getloadavg()[0]:.1f}")
    print(f"local: {results['local']['wall_s']:.1f} s wall ({results['local']['runs_own_s']:.1f} s in the runs)")
    print(f"ray:   {r['wall_s']:.1f} s wall ({r['runs_own_s']:.1f} s in the runs on the workers); "
          f"overhead per run {r['overhead_per_run_s']:.2f} s; speed-up {results['local']['wall_s'] / r['wall_s']:.2f}x")
    print(f"same WER in every run: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
