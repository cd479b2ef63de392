#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run the main job: the paper's study on the embedded
# whisper tiny.en, evaluated on the LibriSpeech test-other sample in ../shared/data and
# calibrated on LJ Speech LJ001-* (disjoint from every evaluation set). Sized to finish within
# about 30 minutes on a 2-core CPU; rerunning resumes. Extra arguments go to `asrprune reproduce`
# (e.g. --limit 300 --preset full for the whole grid). --max-new-tokens 200 bounds the time a
# collapsed variant spends looping (tiny.en's longest hypothesis on the 300 test-other utterances
# has 136 tokens); the cap is recorded with every result and a capped hypothesis is flagged as a hallucination.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${ASRPRUNE_SHARED_DATA:-../shared/data}
exec .venv/bin/asrprune reproduce tiny.en "$DATA/librispeech_test_other/manifest.jsonl" \
    --calibration "$DATA/ljspeech/manifest.jsonl::LJ001-*" \
    --out runs/study --limit 40 --calibration-limit 10 --sparsities 0.3,0.5 --max-new-tokens 200 "$@"
