"""Speed, size and WER of structurally pruned Whisper base against dense tiny.en and dense base.

    python benchmarks/bench_structured.py                                  # 300 test-other, torch fp32 + CTranslate2 int8
    python benchmarks/bench_structured.py --limit 40 --engines torch-fp32,torch-bf16,ct2-fp32,ct2-int8

Every model decodes the same utterances on every engine, in one process:

- ``torch-fp32`` / ``torch-bf16``: ``asrprune.evaluation.evaluate`` under the ``standard``
  protocol (greedy, no timestamps, batch 16; the model loaded with ``asrprune.load_model``, which
  also loads per-layer shapes);
- ``ct2-fp32`` / ``ct2-int8``: faster-whisper on the CTranslate2 export, greedy, no timestamps,
  temperature 0 (the standard protocol's decoding), one utterance at a time, for the variants
  CTranslate2 can express (removed heads it cannot; those rows say so).

The utterances are cut into chunks and each chunk is run by every (model, engine) in turn, the
order rotating from chunk to chunk, so that a shared machine's changing load falls on all of
them alike (see bench_evaluate.py). Printed per row: audio seconds per wall second, WER with its
95% bootstrap interval, parameters, size on disk (safetensors for torch, ``model.bin`` for
CTranslate2 at that engine's precision), and for each pruned base the paired comparison with
dense tiny.en on the same engine (delta WER, paired-bootstrap interval, permutation p). A
Pareto figure (WER against throughput and against size) is written with ``--figure``.

Variants (``--variants``; base pruned one-shot, structure from ``asrprune.structured``):
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# name -> (plan text, score, repair)
VARIANTS = {
    "ffn25": ("encoder.ffn=0.25@neurons,decoder.ffn=0.25@neurons", "fluctuation", "bias"),
    "ffn50": ("encoder.ffn=0.5@neurons,decoder.ffn=0.5@neurons", "fluctuation", "bias"),
    "ffn25_refit": ("encoder.ffn=0.25@neurons,decoder.ffn=0.25@neurons", "fluctuation", "refit"),
    "ffn50_refit": ("encoder.ffn=0.5@neurons,decoder.ffn=0.5@neurons", "fluctuation", "refit"),
    "heads25": ("encoder.self_attn=0.25@heads,decoder.self_attn=0.25@heads,cross_attn=0.25@heads", "wanda", "none"),
    "dec4": ("decoder.layers=0.34@layers", "loss", "none"),
    "dec5": ("decoder.layers=0.17@layers", "loss", "none"),
    "dec2": ("decoder.layers[1:-1]=drop", "magnitude", "none"),
    "enc_ffn50_dec4": ("encoder.ffn=0.5@neurons,decoder.layers=0.34@layers", "wanda", "none"),
    "dec2_ffn25": ("decoder.layers[1:-1]=drop,encoder.ffn=0.25@neurons", "fluctuation", "bias"),
}
__doc__ += "".join(f"\n- ``{k}``: ``{v[0]}``, score {v[1]}, repair {v[2]}" for k, v in VARIANTS.items()) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "librispeech_test_other" / "manifest.jsonl"))
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--calibration", default=str(SHARED / "ljspeech" / "manifest.jsonl"))
    p.add_argument("--include", default="LJ001-*", help="calibration id pattern (disjoint from --data)")
    p.add_argument("--calibration-limit", type=int, default=100)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--engines", default="torch-fp32,ct2-int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=50, help="utterances per interleaved chunk")
    p.add_argument("--workdir", default=None, help="where the pruned models are written (default: a temporary folder)")
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default=None, help="Pareto PNG to write")
    return p.parse_args(argv)


def _dir_bytes(path: Path, names: tuple[str, ...]) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name in names)


def build(args, work: Path) -> dict[str, dict]:
    """Dense tiny.en and base, and the pruned base variants, saved and exported."""
    import torch

    from asrprune.calibration import build_examples
    from asrprune.config import PrunePlan
    from asrprune.export import export_ctranslate2, save_pruned
    from asrprune.manifests import read_speech_set
    from asrprune.models import load_model, model_fingerprint
    from asrprune.structured import prune_structured

    models: dict[str, dict] = {}
    calib = read_speech_set(args.calibration, include=args.include, limit=args.calibration_limit)
    for name in ["tiny.en", "base"] + [v for v in args.variants.split(",") if v]:
        d = work / name
        spec = name if name in ("tiny.en", "base") else "base"
        if not (d / "pruning.json").is_file():
            model, processor = load_model(spec)
            fp = model_fingerprint(model)
            info: dict = {}
            t0 = time.perf_counter()
            if name in VARIANTS:
                text, score, repair = VARIANTS[name]
                plan = PrunePlan.parse(text, score=score)
                plan = PrunePlan.from_dict({**plan.to_dict(), "repair": repair})
                examples = build_examples(model, processor, calib.utterances, progress=False) \
                    if score != "magnitude" or repair != "none" else None
                info = prune_structured(model, plan, calibration=examples, progress=False).to_dict()
            prune_s = time.perf_counter() - t0
            save_pruned(model, processor, d, pruning={**info, "prune_s": prune_s}, source=spec, source_fingerprint=fp)
            del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        for q, sub in (("float32", "ct2-fp32"), ("int8", "ct2-int8")):
            if not (d / sub / "model.bin").is_file():
                try:
                    export_ctranslate2(d, d / sub, quantization=q if q != "float32" else None, overwrite=True)
                except ValueError as exc:
                    (d / f"{sub}.refused.txt").write_text(str(exc))
        info = json.loads((d / "pruning.json").read_text())
        struct = (info.get("pruning") or {}).get("structure") or {}
        models[name] = {
            "dir": d, "spec": spec, "plan": VARIANTS.get(name, ("dense", "", ""))[0],
            "score": VARIANTS.get(name, ("", None, None))[1], "repair": VARIANTS.get(name, ("", None, None))[2],
            "params": struct.get("params_after") or info["saved_sparsity"]["n_parameters"],
            "torch_bytes": _dir_bytes(d, ("model.safetensors", "model.structured.safetensors")),
            "ct2": {sub: (d / sub) if (d / sub / "model.bin").is_file() else None for sub in ("ct2-fp32", "ct2-int8")},
            "ct2_refused": next((p.read_text() for p in d.glob("ct2-*.refused.txt")), None),
            "prune_s": (info.get("pruning") or {}).get("prune_s"),
        }
    return models


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    from asrprune.decoding import DecodeOptions
    from asrprune.evaluation import evaluate
    from asrprune.manifests import load_audio, read_speech_set
    from asrprune.models import load_model
    from asrprune.scoring import default_normalizer, score_utterance
    from asrprune.stats import bootstrap_ci, paired_bootstrap, permutation_pvalue

    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_structured_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building models in {work}", file=sys.stderr, flush=True)
    models = build(args, work)
    speech = read_speech_set(args.data, limit=args.limit)
    utts = speech.utterances
    audios = [load_audio(u) for u in utts]
    audio_s = sum(len(a) for a in audios) / 16000
    engines = [e for e in args.engines.split(",") if e]

    runners = {}
    normalizer = None
    for name, m in models.items():
        for engine in engines:
            key = (name, engine)
            if engine.startswith("torch"):
                dtype = "bfloat16" if engine == "torch-bf16" else "float32"
                model, processor = load_model(m["dir"], dtype=dtype)
                normalizer = normalizer or default_normalizer(processor)[0]
                options = DecodeOptions(device="cpu", dtype=dtype, batch_size=16)

                def run(idx, model=model, processor=processor, options=options):
                    res = evaluate(model, processor, [utts[i] for i in idx], options, progress=False)
                    return [r["hypothesis"] for r in res.rows]
            else:
                ct2_dir = m["ct2"]["ct2-fp32"]
                if ct2_dir is None:
                    continue
                from faster_whisper import WhisperModel

                fw = WhisperModel(str(ct2_dir), device="cpu", compute_type="int8" if engine == "ct2-int8" else "float32",
                                  cpu_threads=args.threads)

                def run(idx, fw=fw):
                    out = []
                    for i in idx:
                        segs, _ = fw.transcribe(audios[i], beam_size=1, without_timestamps=True, temperature=0.0,
                                                condition_on_previous_text=False, vad_filter=False, language="en")
                        out.append("".join(s.text for s in segs))
                    return out
            runners[key] = run
    for run in runners.values():  # warm-up, untimed
        run([0])
    chunks = [list(range(i, min(i + args.chunk, len(utts)))) for i in range(0, len(utts), args.chunk)]
    keys = list(runners)
    texts = {k: [] for k in keys}
    wall = dict.fromkeys(keys, 0.0)
    # progress after every chunk (transcripts and timed seconds per model and engine), so an
    # interrupted benchmark resumes at its next chunk, a larger --limit extends a smaller one, and
    # a variant or engine added later is run from the first chunk while the others keep theirs;
    # only the same measurement (data, chunk size, threads) resumes
    progress_path = work / "progress.json"
    setup = {"data": args.data, "chunk": args.chunk, "threads": args.threads}
    ids = [u.id for u in utts]
    if progress_path.is_file():
        saved = json.loads(progress_path.read_text())
        same = {k: v for k, v in saved.get("setup", {}).items() if k != "keys"} == setup
        if same:
            for k in keys:
                done_k = list(saved["texts"].get("|".join(k), []))
                n_k = len(done_k)
                if saved["ids"][:n_k] == ids[:n_k] and (n_k % args.chunk == 0 or n_k == len(ids)):
                    texts[k] = done_k
                    wall[k] = float(saved["wall"].get("|".join(k), 0.0))
            print(f"resuming ({progress_path}): " + ", ".join(f"{'/'.join(k)} {len(texts[k])}" for k in keys),
                  file=sys.stderr, flush=True)
        else:
            print(f"{progress_path} is from another setup: starting over", file=sys.stderr, flush=True)
    for c, idx in enumerate(chunks):
        todo = [k for k in keys[c % len(keys):] + keys[:c % len(keys)] if len(texts[k]) < idx[-1] + 1]
        if not todo:
            continue
        for k in todo:
            t0 = time.perf_counter()
            texts[k] += runners[k](idx)
            wall[k] += time.perf_counter() - t0
        tmp = progress_path.with_suffix(".tmp")
        longest = max(keys, key=lambda k: len(texts[k]))
        tmp.write_text(json.dumps({"setup": {**setup, "keys": [list(k) for k in keys]}, "ids": ids[:len(texts[longest])],
                                   "texts": {"|".join(k): texts[k] for k in keys},
                                   "wall": {"|".join(k): wall[k] for k in keys}}))
        os.replace(tmp, progress_path)
        print(f"  chunk {c + 1}/{len(chunks)} done", file=sys.stderr, flush=True)

    rows = []
    errors, looping = {}, {}
    words = None
    for k in keys:
        scored = [score_utterance(u.text, h, normalizer) for u, h in zip(utts, texts[k])]
        e = np.array([s["substitutions"] + s["deletions"] + s["insertions"] for s in scored], dtype=float)
        w = np.array([s["ref_words"] for s in scored], dtype=float)
        words = w
        errors[k] = e
        looping[k] = np.array([s["insertions"] > s["ref_words"] for s in scored])
        name, engine = k
        m = models[name]
        size = m["torch_bytes"] if engine.startswith("torch") else _dir_bytes(m["ct2"]["ct2-int8" if engine == "ct2-int8" else "ct2-fp32"], ("model.bin",))
        rows.append({"model": name, "engine": engine, "plan": m["plan"], "score": m["score"], "repair": m["repair"], "params": m["params"], "size_mb": size / 2**20,
                     "audio_s_per_s": audio_s / wall[k], "wall_s": wall[k], "wer": float(e.sum() / w.sum()),
                     "wer_ci": list(bootstrap_ci(e, w)), "prune_s": m["prune_s"],
                     # hypotheses with more insertions than the reference has words: repetition loops
                     "loops": int(sum(s["insertions"] > s["ref_words"] for s in scored))})
    for r in rows:
        ref = ("tiny.en", r["engine"])
        if r["model"] not in ("tiny.en",) and ref in errors:
            a, b = errors[ref], errors[(r["model"], r["engine"])]
            r["vs_tiny"] = {"delta": float((b.sum() - a.sum()) / words.sum()), "ci": list(paired_bootstrap(a, b, words)),
                            "p": float(permutation_pvalue(a, b))}
            # a reading aid, not the result: the same comparison where neither hypothesis loops
            keep = ~(looping[ref] | looping[(r["model"], r["engine"])])
            r["vs_tiny_no_loops"] = {"n": int(keep.sum()), "delta": float((b[keep].sum() - a[keep].sum()) / words[keep].sum()),
                                     "ci": list(paired_bootstrap(a[keep], b[keep], words[keep]))}
    print(f"{len(utts)} utterances of {speech.name} ({audio_s:.0f} s audio), {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'model':16} {'engine':9} {'params':>11} {'size MB':>8} {'audio-s/s':>9} {'WER % [95% CI]':>22} {'loops':>5}  vs dense tiny.en (same engine)")
    for r in rows:
        vs = r.get("vs_tiny")
        vtxt = "" if not vs else (f"{100 * vs['delta']:+.2f} [{100 * vs['ci'][0]:+.2f}, {100 * vs['ci'][1]:+.2f}] "
                                  f"p={vs['p']:.3g}")
        print(f"{r['model']:16} {r['engine']:9} {r['params']:>11,} {r['size_mb']:8.1f} {r['audio_s_per_s']:9.2f} "
              f"{100 * r['wer']:7.2f} [{100 * r['wer_ci'][0]:5.2f}, {100 * r['wer_ci'][1]:5.2f}] {r['loops']:5}  {vtxt}")
    for name, m in models.items():
        if m["ct2_refused"]:
            print(f"{name}: no CTranslate2 rows: {m['ct2_refused'].split(';')[0]}")
    for engine in engines:
        tiny = next((r for r in rows if r["model"] == "tiny.en" and r["engine"] == engine), None)
        if tiny is None:
            continue
        wins = [r for r in rows if r["engine"] == engine and r["model"] not in ("tiny.en", "base")
                and r["audio_s_per_s"] >= tiny["audio_s_per_s"] and r.get("vs_tiny") and r["vs_tiny"]["ci"][1] < 0
                and r["vs_tiny"]["p"] < 0.05]
        print(f"target on {engine} (a pruned base at least as fast as dense tiny.en with a significantly lower WER): "
              + (", ".join(r["model"] for r in wins) if wins else "not reached"))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "audio_s": audio_s, "rows": rows}, indent=2, default=str))
    if args.figure:
        from asrprune.figures import pareto_figure

        pareto_figure([{"series": r["engine"], "label": r["model"], "throughput": r["audio_s_per_s"], "size": r["size_mb"],
                        "wer": r["wer"]} for r in rows], Path(args.figure),
                      title="Structured pruning of Whisper base against dense tiny.en and base", size_label="size on disk (MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
