#!/usr/bin/env bash
# Set up everything (scripts/setup.sh --test) and run the test suite: unit tests on a tiny
# random Whisper and integration tests on the embedded tiny.en with real speech from
# ../shared/data. Extra arguments go to pytest (e.g. -m slow for whisper base).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
