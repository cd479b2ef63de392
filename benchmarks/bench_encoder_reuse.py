"""Benchmark: encoder-output reuse for decoder-only pruned variants (what a sweep does).

On the same utterances, the unpruned baseline is evaluated once with an ``EncoderCache`` (this
fills it); then each of N variants that prune only decoder weights is evaluated twice, once
recomputing the encoder (no cache) and once reusing the baseline's encoder outputs (the cache),
back to back, alternating which goes first so that a change of machine load hits both alike.
The weights are restored exactly between variants the way ``SweepRunner`` does it. Prints the
wall time of every evaluation, the totals over the variants, the encoder windows (counted
by a hook on the encoder) and checks that transcripts are identical with and without reuse
(exit status 1 if not).

    python benchmarks/bench_encoder_reuse.py                    # tiny.en, 20 test-other utts, 3 variants
    python benchmarks/bench_encoder_reuse.py --variants 5 --repeats 2
    python benchmarks/bench_encoder_reuse.py --model base --device cuda

Model loading and audio decoding of the manifest are not timed; each timed evaluation includes
reading audio, features, encoder (or cache lookups), generation and scoring.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "librispeech_test_other" / "manifest.jsonl"
VARIANTS = ("decoder_self_attn=0.3", "decoder_ffn=0.3", "cross_attn=0.3", "decoder_self_attn=0.5",
            "decoder_ffn=0.5", "cross_attn=0.5", "token_embeddings=0.2", "early_decoder=0.3")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--variants", type=int, default=3, help=f"how many of {', '.join(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=1, help="timed pairs per variant (median reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)

    import torch

    from asrprune.config import PrunePlan
    from asrprune.decoding import DecodeOptions, EncoderCache
    from asrprune.evaluation import evaluate
    from asrprune.manifests import read_speech_set
    from asrprune.prune import prune_model
    from asrprune.sweep import SweepRunner

    if args.threads:
        torch.set_num_threads(args.threads)
    options = DecodeOptions(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    speech = read_speech_set(args.data, limit=args.limit)
    runner = SweepRunner(progress=False)
    slot = runner.model(args.model, device=str(options.resolved_device()), dtype=options.dtype)
    audio_s = sum(u.duration_s or 0.0 for u in speech.utterances)

    def timed(cache):
        calls = runner.encoder_windows
        if options.resolved_device().type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = evaluate(slot.model, slot.processor, speech, options, progress=False, encoder_cache=cache)
        if options.resolved_device().type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, runner.encoder_windows - calls, [r.get("hypothesis") for r in res.rows], res.wer

    cache = EncoderCache()
    base_s, base_calls, _, base_wer = timed(cache)
    print(f"model {args.model}, {len(speech.utterances)} utterances ({audio_s:.0f} s of audio) of {args.data}; "
          f"device {options.resolved_device()}, {options.dtype}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"baseline (fills the cache): {base_s:.1f} s, {base_calls} encoder windows, WER {100 * base_wer:.2f}%")
    print(f"{'variant':<24} {'no reuse s':>10} {'reuse s':>8} {'saved':>6} {'enc windows':>11} {'WER %':>6} {'transcripts':>12}")
    tot_plain = tot_reuse = 0.0
    identical = True
    for k, text in enumerate(VARIANTS[: args.variants]):
        slot.restore()
        prune_model(slot.model, PrunePlan.parse(text))
        assert not slot.encoder_changed(), f"{text} touches the encoder"
        plain_t, reuse_t = [], []
        for rep in range(args.repeats):
            order = ("plain", "reuse") if (k + rep) % 2 == 0 else ("reuse", "plain")
            for which in order:
                t, calls, hyps, wer = timed(None if which == "plain" else cache)
                if which == "plain":
                    plain_t.append(t)
                    plain = (calls, hyps, wer)
                else:
                    reuse_t.append(t)
                    reuse = (calls, hyps, wer)
        same = plain[1] == reuse[1] and plain[2] == reuse[2]
        identical &= same
        p, r = statistics.median(plain_t), statistics.median(reuse_t)
        tot_plain += p
        tot_reuse += r
        print(f"{text:<24} {p:>10.1f} {r:>8.1f} {100 * (1 - r / p):>5.0f}% {plain[0]:>4} -> {reuse[0]:<3} "
              f"{100 * plain[2]:>6.2f} {'identical' if same else 'DIFFERENT':>12}")
    slot.restore()
    print(f"{args.variants} decoder-only variants: {tot_plain:.1f} s without reuse, {tot_reuse:.1f} s with reuse "
          f"({tot_plain / tot_reuse:.2f}x, {100 * (1 - tot_reuse / tot_plain):.0f}% of the time saved); "
          f"cache {len(cache)} entries, {cache.nbytes / 2**20:.0f} MiB")
    print(f"transcripts and WER identical with and without reuse: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
