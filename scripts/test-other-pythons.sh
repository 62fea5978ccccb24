#!/usr/bin/env bash
# The set-up and a fast subset (image, audio and video decoding; the main job's served multimodal request; NIXL
# WRITEs between two processes) on every supported Python other than the one .venv was made with, each in a temporary
# .venv-pyX.Y. Pythons that this machine lacks are reported and left out; set MIMO_REQUIRE_PYTHONS=1 to fail on them
# instead.
#   --setup-only: only make the venvs (scripts/test.sh runs this beside the main suite, at low CPU priority: it is
#                 mostly downloads, plus numpy 1.26's build from source on 3.13); a venv is marked ready when its
#                 set-up completed, and the default run reuses a ready one, else makes it again.
# Disk: PyPI's torch for these Pythons is a CUDA build (~5 GB installed). uv installs it, hardlinking from one cache on
# the repository's file system, so the CUDA libraries are stored once; each Python's own torch/triton are dropped from
# the cache and the venvs removed once the subsets have run.
set -euo pipefail
cd "$(dirname "$0")/.."
SUPPORTED=(3.10 3.11 3.12 3.13)  # pyproject's requires-python and the classifiers say the same
SUBSET=(tests/test_processing_image.py tests/test_processing_audio.py tests/test_processing_video.py
        tests/test_processing_corrupt_media.py
        tests/test_serving_demo.py::test_demo_streams_a_multimodal_reply_and_stops_the_server  # the main job
        tests/test_epd_nixl.py)  # nixl-cu13 has a wheel for each: its transfers run on each
PER_PYTHON=(torch triton)  # the big cp3X-specific wheels; the py3-none CUDA libraries stay cached for the next Python
setup_only=0
[ "${1:-}" = --setup-only ] && setup_only=1
default=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
.venv/bin/python -m pip install -q uv 2>&1 | grep -v "is ignored" || true
export UV=$PWD/.venv/bin/uv UV_CACHE_DIR=$PWD/.cache/uv UV_LINK_MODE=hardlink
missing=() ready=()
for version in "${SUPPORTED[@]}"; do
  [ "$version" = "$default" ] && continue
  if ! PYTHON=python$version bash scripts/setup.sh --check-python 2>/dev/null; then
    echo "python$version: not on this machine, left out"
    missing+=("$version")
    continue
  fi
  venv=.venv-py$version
  if [ ! -e "$venv/.ready" ]; then
    echo "python$version: set-up ($(df -h --output=avail . | tail -1 | tr -d ' ') free)"
    rm -rf "$venv"
    SECONDS=0
    PYTHON=python$version VENV=$venv bash scripts/setup.sh
    touch "$venv/.ready"
    echo "python$version: set up in ${SECONDS}s"
  fi
  [ $setup_only = 1 ] && continue
  ready+=("$version")
done
# the subsets at once, each into its own log (mostly a tritonserver start and waits: two cores run three side by side
# in about half their sum); the logs are printed in order, and any failure fails the run
mkdir -p .cache
pids=()
for version in "${ready[@]}"; do
  venv=.venv-py$version
  (
    echo "python$version: subset"
    $venv/bin/python -c 'import av, torch, transformers, PIL; print("  PyAV", av.__version__, "torch", torch.__version__, "transformers", transformers.__version__, "Pillow", PIL.__version__)'
    $venv/bin/python -m pytest -q -p no:cacheprovider "${SUBSET[@]}"
  ) > ".cache/subset-py$version.log" 2>&1 &
  pids+=($!)
done
failed=()
for i in "${!pids[@]}"; do
  version=${ready[$i]}
  wait "${pids[$i]}" || failed+=("$version")
  cat ".cache/subset-py$version.log"
  rm -rf ".venv-py$version"
done
[ ${#ready[@]} -gt 0 ] && "$UV" cache clean -q "${PER_PYTHON[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "the subset failed on: ${failed[*]}" >&2
  exit 1
fi
if [ ${#missing[@]} -gt 0 ] && [ "${MIMO_REQUIRE_PYTHONS:-0}" = 1 ]; then
  echo "missing Pythons: ${missing[*]}" >&2
  exit 1
fi
