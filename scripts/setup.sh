#!/usr/bin/env bash
# Creates ./.venv (or $VENV) with the project installed (editable) and its test extras, for $PYTHON (default python3).
# CPU machines: torch comes from the local CPU build (`torch==2.13.0`); an unpinned torch would pull GBs of CUDA
# wheels. Where the interpreter already has torch (GPU machines ship 2.11+cu130), the venv inherits it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# pyenv's shim for python3.X refuses unless that version is selected; take the installed one directly then.
if ! "$PYTHON" -c "" 2>/dev/null && command -v pyenv >/dev/null; then
  for candidate in "$(pyenv root)"/versions/"${PYTHON#python}".*/bin/"$PYTHON"; do
    [ -x "$candidate" ] && PYTHON=$candidate
  done
fi
"$PYTHON" -c "import sys; assert sys.version_info >= (3, 10), sys.version" || { echo "setup: $PYTHON is not a Python >= 3.10" >&2; exit 1; }
VENV=${VENV:-.venv}
if [ ! -x "$VENV"/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
"$VENV"/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
"$VENV"/bin/python -c "import torch" 2>/dev/null || "$VENV"/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
"$VENV"/bin/python -c "import torch" # fail loudly if torch did not install
"$VENV"/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
"$VENV"/bin/python -I -c "import mimo, builders, client, numpy; assert numpy.__version__ < '2', numpy.__version__"
