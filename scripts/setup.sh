#!/usr/bin/env bash
# Creates ./.venv (or $VENV) with the project installed (editable) and its test extras, for $PYTHON (default python3,
# any of 3.10 to 3.13). `--check-python` only checks that $PYTHON is there and supported.
# torch: `torch==2.13.0` first (on the CPU machines here a local CPU build for Python 3.11; for other Pythons pip takes
# PyPI's, which pulls the CUDA libraries, a few GB); an unpinned torch could resolve to a release outside the range.
# Where the interpreter already has torch (GPU machines ship 2.11+cu130), the venv inherits it.
# With UV=<path to uv>, packages are installed by uv instead of pip: uv hardlinks them from its cache, so several venvs
# (scripts/test-other-pythons.sh) share one copy of the CUDA libraries instead of a few GB each.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# pyenv's shim for python3.X refuses unless that version is selected; take the installed one directly then.
if ! "$PYTHON" -c "" 2>/dev/null && command -v pyenv >/dev/null; then
  for candidate in "$(pyenv root)"/versions/"${PYTHON#python}".*/bin/"$PYTHON"; do
    [ -x "$candidate" ] && PYTHON=$candidate
  done
fi
"$PYTHON" -c "import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 13), sys.version" 2>/dev/null \
  || { echo "setup: $PYTHON is not a Python 3.10 to 3.13" >&2; exit 1; }
[ "${1:-}" = --check-python ] && exit 0
VENV=${VENV:-.venv}
if [ ! -x "$VENV"/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
install() {
  if [ -n "${UV:-}" ]; then
    "$UV" pip install -q --python "$VENV"/bin/python "$@"
  else
    "$VENV"/bin/python -m pip install -q "$@" 2>&1 | grep -v "is ignored" || true
  fi
}
[ -n "${UV:-}" ] || install --upgrade pip
"$VENV"/bin/python -c "import torch" 2>/dev/null || install torch==2.13.0
"$VENV"/bin/python -W ignore -c "import torch" # fail loudly if torch did not install (numpy comes later)
# triton: a CUDA torch brings its own (GPU machines: 3.6); beside a CPU torch the kernels' tests run Triton's
# interpreter, pinned to the GPU machines' release (~190 MB wheel, ~30 s)
"$VENV"/bin/python -c "import triton" 2>/dev/null || install triton==3.6.0
# numpy 1.26 has no wheel for Python 3.13, so it builds from source there; without its SIMD dispatch variants (the
# same results through its baseline kernels) the build took 135 s instead of 212 s on 2 cores
if "$VENV"/bin/python -c "import sys; sys.exit(sys.version_info < (3, 13))"; then
  install -C setup-args=-Ddisable-optimization=true -e '.[test]'
else
  install -e '.[test]'
fi
"$VENV"/bin/python -I -c "import mimo, builders, client, numpy; assert numpy.__version__ < '2', numpy.__version__"
