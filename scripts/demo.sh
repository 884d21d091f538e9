#!/usr/bin/env bash
# Set up .venv and run the main job: train the `small` MoGE model and its top-k twin on the
# embedded corpus (the CPython standard library sources) and write runs/demo/report.md.
# Offline; 7 to 23 minutes on 2 CPU cores (README.md). Extra arguments go to `mogelm compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "plot"
exec .venv/bin/mogelm compare --name demo "$@"
