#!/usr/bin/env bash
# Install fp8train with its test dependencies into ./.venv and run the CPU test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k delayed`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# torch first: on a machine with the local CPU build of 2.13.0 this takes it (no multi-GB CUDA
# download); an existing torch >= 2.11 is kept.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -m pytest -m "not gpu" "$@"
