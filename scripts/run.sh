#!/usr/bin/env bash
# Install fp8train into ./.venv and run the main job: the default pretraining run
# (tiny Llama on the embedded corpus, fp8; GPU if present, else CPU). Arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e .
python scripts/train.py "$@"
