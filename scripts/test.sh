#!/usr/bin/env bash
# Set up .venv (with the dev, serve, plot, triton and eval extras) and run the CPU test suite.
# GPU tests (marked `gpu`) are deselected here; run them on a CUDA machine with `pytest -m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "dev,serve,plot,triton,eval"
export TRITON_INTERPRET=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q "$@"
