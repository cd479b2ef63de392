"""A one-minute check that every stage of asrprune runs on a device (e.g. a lent GPU).

It builds a small random Whisper with a real tokenizer and processor (copied from a converted
model directory, e.g. ``$ASRPRUNE_CACHE/models/tiny.en``), then runs on ``--device``:
evaluate, prune + evaluate of the pruned model, sensitivity with a loss ablation, and a
``reproduce --preset main`` on a few utterances. Its WERs mean nothing (random weights); the
point is that no stage fails on that device before hours of device time go into real runs.

    python scripts/device_smoke.py --tokenizer-from DIR --data MANIFEST --calibration SRC::PAT \
        --device cuda --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

TOKENIZER_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "processor_config.json", "normalizer.json", "preprocessor_config.json")


def build_model(src: Path, out: Path) -> Path:
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = json.loads((src / "config.json").read_text())
    cfg.update(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**cfg)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer-from", required=True, type=Path, help="a converted Whisper directory")
    p.add_argument("--data", required=True, help="evaluation manifest")
    p.add_argument("--calibration", required=True, help="calibration SOURCE[::PATTERN]")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("/tmp/asrprune-smoke"))
    args = p.parse_args(argv)

    shutil.rmtree(args.out, ignore_errors=True)
    model_dir = build_model(args.tokenizer_from, args.out / "model")
    cli = [sys.executable, "-m", "asrprune"]
    common = ["--device", args.device, "--max-new-tokens", "8"]
    steps = [
        ("evaluate", cli + ["evaluate", str(model_dir), args.data, "--out", str(args.out / "eval"),
                            "--limit", "4", "--no-progress", *common]),
        ("prune", cli + ["prune", str(model_dir), "--plan", "decoder_self_attn=0.5,late_encoder=0.5",
                         "--out", str(args.out / "pruned")]),
        ("evaluate pruned", cli + ["evaluate", str(args.out / "pruned"), args.data, "--out",
                                   str(args.out / "eval_pruned"), "--limit", "4", "--no-progress", *common]),
        ("compare", cli + ["compare", str(args.out / "eval"), str(args.out / "eval_pruned")]),
        ("sensitivity", cli + ["sensitivity", str(model_dir), args.calibration, "--out",
                               str(args.out / "sens"), "--limit", "2", "--ablation-sparsities", "0.5",
                               "--device", args.device, "--no-progress"]),
        ("reproduce", cli + ["reproduce", str(model_dir), args.data, "--calibration", args.calibration,
                             "--out", str(args.out / "study"), "--limit", "3", "--calibration-limit", "2",
                             "--preset", "main", "--ablation-sparsities", "0.5", "--no-progress", *common]),
    ]
    failed = []
    for name, cmd in steps:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"smoke {name}: {status} in {time.perf_counter() - t0:.1f} s", flush=True)
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", flush=True)
    study = args.out / "study" / "study.json"
    if study.is_file():
        stages = json.loads(study.read_text()).get("stages", {})
        bad = {k: v.get("error") for k, v in stages.items() if v.get("status") != "ok"}
        print("study stages:", {k: v.get("status") for k, v in stages.items()}, flush=True)
        if bad:
            failed.append("reproduce stages")
            print("failed stages:", bad, flush=True)
        runs = args.out / "study" / "runs.jsonl"
        if runs.is_file():
            rows = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
            bad_runs = [r.get("run_id") or r.get("name") for r in rows if r.get("status") not in (None, "ok", "done")]
            print(f"study runs: {len(rows)}, not ok: {bad_runs}", flush=True)
            if bad_runs:
                failed.append("reproduce runs")
                print([r.get("error") for r in rows if r.get("status") not in (None, "ok", "done")][:3])
    print("SMOKE", "FAILED: " + ", ".join(failed) if failed else "OK", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
