"""Time and peak memory of calibration + pruning: magnitude, Wanda and SparseGPT, side by side.

    python benchmarks/bench_prune.py                                   # tiny.en and base, 40% of linear weights
    python benchmarks/bench_prune.py --models tiny.en --calibration-limit 32 --json bench.json

Every (model, method) runs in a fresh child process, so each peak is its own: the child loads the
model, builds the calibration examples (log-mel features and reference tokens of the calibration
set, the part every calibrated method shares), prunes ``all_linear`` at ``--sparsity`` with the
method (Wanda and SparseGPT sequentially, encoder layers then decoder layers) and reports wall
time per phase and its peak resident memory (``ru_maxrss``) next to the resident memory right after
loading the model. Magnitude pruning, which needs no calibration, is the baseline of the same run.
On a GPU (``--device cuda``) the peak of ``torch.cuda.max_memory_allocated`` is reported too.

``OMP_WAIT_POLICY=PASSIVE`` is set in the children before torch is imported (see
bench_evaluate.py: spinning OpenMP threads slow a shared 2-core machine down).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="tiny.en,base", help="comma-separated asrprune.load_model specs")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sparsity", type=float, default=0.4, help="of all linear weights")
    p.add_argument("--calibration", default=str(SHARED / "ljspeech" / "manifest.jsonl"))
    p.add_argument("--include", default="LJ001-*", help="calibration id pattern")
    p.add_argument("--calibration-limit", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from asrprune.calibration import build_examples
    from asrprune.config import PrunePlan
    from asrprune.manifests import read_speech_set
    from asrprune.models import load_model
    from asrprune.prune import prune_model

    model_spec, method = args.child
    t0 = time.perf_counter()
    model, processor = load_model(model_spec, device=args.device)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    examples, examples_s = None, 0.0
    if method != "magnitude":
        calib = read_speech_set(args.calibration, include=args.include, limit=args.calibration_limit)
        t0 = time.perf_counter()
        examples = build_examples(model, processor, calib.utterances, progress=False)
        examples_s = time.perf_counter() - t0
    plan = PrunePlan.parse(f"all_linear={args.sparsity}", score=method)
    if method == "magnitude":
        plan = PrunePlan.parse(f"all_linear={args.sparsity}@matrix")
    t0 = time.perf_counter()
    result = prune_model(model, plan, calibration=examples)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    prune_s = time.perf_counter() - t0
    out = {
        "model": model_spec, "method": method, "device": args.device, "threads": args.threads,
        "n_calibration": 0 if examples is None else len(examples),
        "load_s": load_s, "examples_s": examples_s, "prune_s": prune_s, "total_s": examples_s + prune_s,
        "rss_loaded_mb": rss_loaded, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sparsity_linear": result.model.linear_weights.sparsity,
        "linear_params": result.model.linear_weights.numel,
    }
    if args.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    results = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", model, method, "--sparsity", str(args.sparsity),
                   "--calibration", args.calibration, "--include", args.include,
                   "--calibration-limit", str(args.calibration_limit), "--threads", str(args.threads),
                   "--device", args.device]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{model} {method} failed")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"  {model} {method}: calibration {row['examples_s']:.1f} s + pruning {row['prune_s']:.1f} s, "
                  f"peak {row['peak_rss_mb']:.0f} MB", flush=True)
    load = os.getloadavg()[0]
    print(f"{args.sparsity:.0%} of all linear weights; calibration: {args.calibration_limit} utterances "
          f"({args.include}); {args.threads} threads, device {args.device} ({platform.processor() or platform.machine()}); "
          f"load average now {load:.1f}")
    head = f"{'model':8} {'method':10} {'calib s':>8} {'prune s':>8} {'total s':>8} {'peak MB':>8} {'+MB vs loaded':>13} " \
           f"{'sparsity %':>10}" + ("  cuda peak MB" if args.device.startswith("cuda") else "")
    print(head)
    for r in results:
        line = (f"{r['model']:8} {r['method']:10} {r['examples_s']:8.1f} {r['prune_s']:8.1f} {r['total_s']:8.1f} "
                f"{r['peak_rss_mb']:8.0f} {r['peak_rss_mb'] - r['rss_loaded_mb']:13.0f} {100 * r['sparsity_linear']:10.2f}")
        if "cuda_peak_mb" in r:
            line += f"  {r['cuda_peak_mb']:12.0f}"
        print(line)
    for model in dict.fromkeys(r["model"] for r in results):
        base = next((r for r in results if r["model"] == model and r["method"] == "magnitude"), None)
        for r in results:
            if r["model"] == model and r["method"] != "magnitude" and base is not None:
                print(f"{model} {r['method']} vs magnitude: {r['total_s'] / max(base['total_s'], 1e-9):.0f}x the time, "
                      f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x the peak memory")
        sg = next((r for r in results if r["model"] == model and r["method"] == "sparsegpt"), None)
        if sg is not None and model == "base":
            verdict = "met" if sg["total_s"] <= 300 else "NOT met"
            print(f"target SparseGPT on base within 5 minutes: {sg['total_s'] / 60:.1f} min, {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_average": load, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
