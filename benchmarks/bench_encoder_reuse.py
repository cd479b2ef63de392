"""Benchmark: encoder-output reuse across decoder-only pruned variants of a sweep.

Runs the same small sweep twice, in one process and on the same utterances: the unpruned
baseline plus N variants that prune only decoder weights, once with ``encoder_cache: off``
(every run encodes every utterance) and once with ``encoder_cache: memory`` (the variants reuse
the baseline's encoder outputs). Prints the wall time of the pruned variants and of the whole
sweep under both settings, the encoder forward calls, and checks that every run's transcripts
are identical with and without reuse (exit status 1 if not).

    python benchmarks/bench_encoder_reuse.py                      # tiny.en, 20 test-other utts
    python benchmarks/bench_encoder_reuse.py --model base --limit 20 --device cuda

Model load time is excluded (the model is loaded once before each sweep); a run's time is its
``wall_s`` in runs.jsonl (restore weights, prune, decode, score, paired comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "librispeech_test_other" / "manifest.jsonl"
VARIANTS = ("decoder_self_attn@0.3", "decoder_ffn@0.3", "cross_attn@0.3", "decoder_self_attn@0.5",
            "decoder_ffn@0.5", "cross_attn@0.5", "token_embeddings@0.2", "early_decoder@0.3")


def _hyps(run_dir: Path) -> dict[str, str]:
    rows = [json.loads(x) for x in (run_dir / "utterances.jsonl").read_text().splitlines() if x.strip()]
    return {r["id"]: r["hypothesis"] for r in rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--variants", type=int, default=3, help=f"how many of {', '.join(VARIANTS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="keep the two sweep directories here")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from asrprune.config import PlanEntry, PrunePlan
    from asrprune.evaluation import DecodeOptions
    from asrprune.sweep import DataSpec, SweepRunner, SweepSpec, Variant, latest_rows, read_rows, run_sweep

    variants = []
    for name in VARIANTS[: args.variants]:
        selector, s = name.split("@")
        variants.append(Variant(name=name, plan=PrunePlan((PlanEntry(selector, float(s)),)), group=selector,
                                selector=selector, target_sparsity=float(s)))
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_encoder_reuse_"))
    decode = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size}
    results = {}
    for mode in ("off", "memory"):
        spec = SweepSpec(models=(args.model,), data=(DataSpec(args.data),),
                         plans=tuple(variants), decode=decode, limit=args.limit, encoder_cache=mode,
                         name=f"bench-{mode}")
        runner = SweepRunner(progress=False)
        opts = DecodeOptions(**decode)
        runner.model(args.model, device=str(opts.resolved_device()), dtype=opts.dtype)  # load untimed
        t0 = time.perf_counter()
        summary = run_sweep(spec, out / mode, progress=False, runner=runner)
        total = time.perf_counter() - t0
        rows = {r["variant"]: r for r in latest_rows(read_rows(out / mode / "runs.jsonl")).values()}
        bad = [r["variant"] for r in rows.values() if r["status"] != "ok"]
        if bad:
            print(f"runs failed under encoder_cache={mode}: {bad}", file=sys.stderr)
            return 1
        results[mode] = (rows, total, runner.encoder_calls, summary)

    rows_off, total_off, calls_off, _ = results["off"]
    rows_on, total_on, calls_on, _ = results["memory"]
    n_utt = rows_off["baseline"]["summary"]["n_utterances"]
    audio_s = (rows_off["baseline"]["summary"].get("throughput") or {}).get("audio_seconds")
    print(f"model {args.model}, {n_utt} utterances of {args.data}, device {args.device}, {args.dtype}, "
          f"batch {args.batch_size}; {len(variants)} decoder-only variants + baseline")
    print(f"{'run':<26} {'wall s: no reuse':>16} {'reuse':>6} {'cpu s: no reuse':>15} {'reuse':>6} "
          f"{'enc calls':>10} {'transcripts':>12}")
    identical = True
    pruned_off = pruned_on = cpu_off = cpu_on = 0.0
    for name in ["baseline", *[v.name for v in variants]]:
        a, b = rows_off[name], rows_on[name]
        same = _hyps(out / "off" / a["run_dir"]) == _hyps(out / "memory" / b["run_dir"])
        identical &= same and a["summary"]["wer"] == b["summary"]["wer"]
        if name != "baseline":
            pruned_off += a["wall_s"]
            pruned_on += b["wall_s"]
            cpu_off += a["cpu_s"]
            cpu_on += b["cpu_s"]
        print(f"{name:<26} {a['wall_s']:>16.1f} {b['wall_s']:>6.1f} {a['cpu_s']:>15.1f} {b['cpu_s']:>6.1f} "
              f"{a['encoder_calls']:>4} -> {b['encoder_calls']:<3} {'identical' if same else 'DIFFERENT':>12}")
    print(f"pruned variants: {pruned_off:.1f} s without reuse, {pruned_on:.1f} s with reuse "
          f"({pruned_off / max(pruned_on, 1e-9):.2f}x faster, {100 * (1 - pruned_on / pruned_off):.0f}% saved); "
          f"CPU time {cpu_off:.1f} s -> {cpu_on:.1f} s ({100 * (1 - cpu_on / max(cpu_off, 1e-9)):.0f}% saved)")
    print(f"whole sweep:     {total_off:.1f} s without reuse, {total_on:.1f} s with reuse "
          f"({total_off / max(total_on, 1e-9):.2f}x); encoder forward calls {calls_off} -> {calls_on}")
    if audio_s:
        print(f"audio per run: {float(audio_s):.1f} s")
    print(f"transcripts and WER identical in every run: {'yes' if identical else 'NO'}")
    print(f"sweep directories: {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
