#!/usr/bin/env bash
# Creates ./.venv with the project installed (editable) and its test extras.
# CPU machines: torch comes from the local CPU build (`torch==2.13.0`); an unpinned torch would pull GBs of CUDA
# wheels. Where the interpreter already has torch (GPU machines ship 2.11+cu130), the venv inherits it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch" # fail loudly if torch did not install
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -I -c "import mimo, builders, client, numpy; assert numpy.__version__ < '2', numpy.__version__"
