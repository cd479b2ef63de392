#!/usr/bin/env bash
# The closing runs that need more than a 2-core CPU, as they were run on the GPU machine this
# workplace lends some tasks (its "device" tool: no network there, at most 64 MiB sent per call).
#
#   (once: echo /.dev/ >> .git/info/exclude)
#   bash scripts/device_study.sh pack      # here: wheels + speech data + converted models as
#                                          # .dev/p0 .dev/p1 ... (pieces of one tar, < 64 MiB each)
# then, there, one piece carried per call (the pieces already sent stay on the warm machine):
#   bash scripts/device_study.sh unpack    # extract the pieces present, install the wheels
#   bash scripts/device_study.sh smoke     # every stage on a small random Whisper, on cuda (1 min)
#   bash scripts/device_study.sh base      # issue 3's benchmark for base fp16, then the base study
#   bash scripts/device_study.sh tiny      # the tiny.en study on test-other, Earnings-22, LJ002-*
#   bash scripts/device_study.sh collect   # results (without the large accumulators) into $OUT
#
# Everything runs in fp32 except the benchmark (fp16, as issue 3 asks), with TF32 off, so the GPU
# numbers are the model's, not a lower-precision approximation of it.
set -euo pipefail
cmd=${1:?usage: device_study.sh pack|unpack|smoke|base|tiny|collect}
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEV=/tmp/dev/bundle
RESULTS=/tmp/dev/out
export PYTHONPATH=$REPO/src:/tmp/site ASRPRUNE_CACHE=$DEV/cache PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NVIDIA_TF32_OVERRIDE=0 TOKENIZERS_PARALLELISM=false
TO=$DEV/data/librispeech_test_other/manifest.jsonl
LJ=$DEV/data/ljspeech/manifest.jsonl
E22=$DEV/data/earnings22_test_4483589/manifest.jsonl
PY=${PYTHON:-python3}

case $cmd in
pack)
  # Order matters: what the base job needs comes first, so it can start before the last piece.
  shared=$(cd "$REPO/../shared/data" && pwd)
  cache=${ASRPRUNE_CACHE_LOCAL:-$HOME/.cache/asrprune}
  stage=$REPO/.dev/stage/bundle
  rm -rf "$REPO/.dev/stage" "$REPO"/.dev/p?
  mkdir -p "$stage/data" "$stage/cache/models"
  if [ ! -d "$REPO/.dev/whl" ]; then  # what the device image (Python 3.12) lacks, or has too old
    "$REPO/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$REPO/.dev/whl" \
      jiwer==4.0.0 rapidfuzz==3.14.6 whisper_normalizer==0.1.15 more_itertools==11.2.1 soundfile==0.14.0 \
      cffi==2.1.1 pycparser==3.12 soxr==1.1.0 transformers==5.24.0
  fi
  cp -r "$REPO/.dev/whl" "$stage/whl"
  for m in base tiny.en; do
    mkdir -p "$stage/cache/models/$m"
    find "$cache/models/$m" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} "$stage/cache/models/$m/" \;
    gzip -1 -c "$cache/models/$m/model.safetensors" > "$stage/cache/models/$m/model.safetensors.gz"
  done
  for d in librispeech_test_other ljspeech earnings22_test_4483589; do
    mkdir -p "$stage/data/$d/audio"; cp "$shared/$d/manifest.jsonl" "$stage/data/$d/"
  done
  cp "$shared"/librispeech_test_other/audio/* "$stage/data/librispeech_test_other/audio/"
  cp "$shared"/ljspeech/audio/* "$stage/data/ljspeech/audio/"
  cp "$shared"/earnings22_test_4483589/audio/* "$stage/data/earnings22_test_4483589/audio/"
  (cd "$REPO/.dev/stage" && {
    ls -d bundle/whl/*; ls -d bundle/cache/models/*/* | grep -v safetensors.gz
    ls -d bundle/data/*/manifest.jsonl bundle/data/librispeech_test_other/audio/*
    ls -d bundle/data/ljspeech/audio/LJ001-*; echo bundle/cache/models/base/model.safetensors.gz
    ls -d bundle/data/ljspeech/audio/LJ002-* bundle/data/earnings22_test_4483589/audio/*
    echo bundle/cache/models/tiny.en/model.safetensors.gz
  } > ../list && tar -cf ../bundle.tar --no-recursion -T ../list)
  split -b 64000000 -d -a 1 "$REPO/.dev/bundle.tar" "$REPO/.dev/p"
  rm -rf "$REPO/.dev/stage" "$REPO/.dev/bundle.tar"
  ls -l "$REPO"/.dev/p?
  ;;
unpack)
  # The device keeps what a call leaves under /tmp while it stays warm, but not the carried
  # files of an earlier call: each call's piece is copied to /tmp/dev/pieces first.
  mkdir -p /tmp/dev/pieces "$RESULTS" /tmp/site
  for f in "$REPO"/.dev/p?; do [ -f "$f" ] && cp -n "$f" /tmp/dev/pieces/; done
  pieces=(); for i in 0 1 2 3 4 5 6 7 8 9; do [ -f /tmp/dev/pieces/p$i ] || break; pieces+=(/tmp/dev/pieces/p$i); done
  echo "pieces there: ${#pieces[@]}"
  if compgen -G "/tmp/dev/running.*" >/dev/null; then
    # a job may be reading the files: never rewrite one; the cut one is a model's .gz (pack's order)
    for gz in $DEV/cache/models/*/model.safetensors.gz; do
      if [ -f "$gz" ] && ! gzip -t "$gz" 2>/dev/null; then rm -f "$gz"; fi
    done
    cat "${pieces[@]}" | tar -x --skip-old-files -C /tmp/dev 2>/dev/null || echo "(the last member is cut: more pieces to come)"
  else
    rm -rf $DEV
    cat "${pieces[@]}" | tar -x -C /tmp/dev 2>/dev/null || echo "(the last member is cut: more pieces to come)"
  fi
  if [ ! -f /tmp/site/.done ] && [ -d $DEV/whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $DEV/whl/*.whl
    touch /tmp/site/.done
  fi
  for gz in $DEV/cache/models/*/model.safetensors.gz; do
    [ -f "$gz" ] || continue; target=${gz%.gz}
    if [ ! -f "$target" ] && gzip -t "$gz" 2>/dev/null; then gunzip -c "$gz" > "$target.tmp" && mv "$target.tmp" "$target"; fi
    if [ -f "$target" ]; then echo "model ready: $target"; fi
  done
  ;;
smoke)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  $PY "$REPO/scripts/device_smoke.py" --tokenizer-from $DEV/cache/models/tiny.en --data "$TO" \
    --calibration "$TO::7*" --device cuda --out /tmp/dev/smoke
  ;;
base)
  mkdir -p "$RESULTS"; touch /tmp/dev/running.base; trap 'rm -f /tmp/dev/running.base' EXIT
  $PY "$REPO/benchmarks/bench_evaluate.py" --model base --data "$TO" --limit 100 --device cuda \
    --dtype float16 --batch-size 64 --threads 8 --systems asrprune,asrprune-beam5,pipeline,pipeline-greedy \
    --json "$RESULTS/bench_base_fp16_cuda.json" 2>&1 | grep -v "max_new_tokens.*max_length" | tee "$RESULTS/bench_base_fp16_cuda.txt"
  $PY -m asrprune reproduce base "$TO" --calibration "$LJ::LJ001-*" --out "$RESULTS/study_base" \
    --preset main --ablation-sparsities 0.5 --device cuda --batch-size 32 --no-progress
  ;;
tiny)
  mkdir -p "$RESULTS"; touch /tmp/dev/running.tiny; trap 'rm -f /tmp/dev/running.tiny' EXIT
  $PY -m asrprune reproduce tiny.en "$TO" "$E22" "$LJ::LJ002-*" --calibration "$LJ::LJ001-*" \
    --out "$RESULTS/study_tiny" --preset main --device cuda --batch-size 32 --no-progress
  ;;
collect)
  out=${OUT:?collect writes into \$OUT}
  cp "$RESULTS"/*.json "$RESULTS"/*.txt "$RESULTS"/*.log "$out/" 2>/dev/null || true
  for s in study_base study_tiny; do
    [ -d "$RESULTS/$s" ] && tar -czf "$out/$s.tgz" -C "$RESULTS" --exclude='*.safetensors' --exclude='encoder_cache' "$s"
  done
  ls -l "$out"
  ;;
*) echo "unknown step $cmd" >&2; exit 2 ;;
esac
