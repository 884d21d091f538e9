#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with plain pip.
# torch is installed first and on its own (the CPU wheel from the machine's wheel folder; see
# ECOSYSTEM.md), then mogelm with the extras named in $1 (default: plot).
# The environment is reused while pyproject.toml and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-plot}"
stamp_want="$(sha256sum pyproject.toml | cut -c1-16)-${extras}"
if [ -x .venv/bin/python ] && [ "$(cat .venv/.mogelm-stamp 2>/dev/null)" = "$stamp_want" ]; then
  exit 0
fi
echo "setting up .venv (torch first, then mogelm[$extras]) ..." >&2
[ -x .venv/bin/python ] || python3 -m venv .venv
quiet() { grep -v -e "is ignored" -e "^WARNING: Location" || true; }
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | quiet
.venv/bin/python -m pip install -q -e ".[$extras]" 2>&1 | quiet
.venv/bin/python -c "import mogelm, torch; print('mogelm', mogelm.__version__, 'torch', torch.__version__)" >&2
echo "$stamp_want" > .venv/.mogelm-stamp
