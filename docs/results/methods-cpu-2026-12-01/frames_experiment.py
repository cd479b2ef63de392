import time, sys, json, torch
from asrprune.models import load_model
from asrprune.manifests import read_speech_set
from asrprune.calibration import build_examples, CalibrationOptions
from asrprune.config import PrunePlan
from asrprune.prune import prune_model, WeightSnapshot
from asrprune.evaluation import evaluate
from asrprune.decoding import DecodeOptions
import logging; logging.disable(logging.WARNING)
spec, ncal, nev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, proc = load_model(spec)
calib = read_speech_set("../shared/data/ljspeech/manifest.jsonl", include="LJ001-*", limit=ncal).utterances
ev = read_speech_set("../shared/data/librispeech_test_other/manifest.jsonl", limit=nev)
ex = build_examples(model, proc, calib, progress=False)
snap = WeightSnapshot(model, device="cpu")
opts = DecodeOptions(device="cpu", max_new_tokens=200)
base = evaluate(model, proc, ev, opts, progress=False)
print(json.dumps({"model": spec, "ncal": ncal, "nev": nev, "dense": base.wer}), flush=True)
for score in ["sparsegpt", "wanda"]:
    for frames in ["speech", "all"]:
        for s in [0.4, 0.5]:
            snap.restore()
            plan = PrunePlan.parse(f"all_linear={s}", score=score)
            t = time.time()
            r = prune_model(model, plan, calibration=ex, options=CalibrationOptions(frames=frames))
            dt = time.time() - t
            res = evaluate(model, proc, ev, opts, progress=False)
            print(json.dumps({"score": score, "frames": frames, "s": s, "wer": res.wer, "delta": res.wer - base.wer, "prune_s": dt, "lin": r.linear_sparsity}), flush=True)
