#!/usr/bin/env bash
# Install cosy and everything its tests, recipes and synthetic corpus need on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    espeak-ng flite festival festvox-kallpc16k sox libsndfile1 fortune-mod fortunes-min fortunes >/dev/null
# The CPU build of torch first, so that cosy's `torch>=2.1` does not pull a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,hf,eval,deepspeed]"
