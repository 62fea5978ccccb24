#!/usr/bin/env bash
# The set-up and a fast subset (image, audio and video decoding; the main job's served multimodal request) on every
# supported Python other than the one .venv was made with, each in its own .venv-pyX.Y. Pythons that this machine
# lacks are reported and left out; set MIMO_REQUIRE_PYTHONS=1 to fail on them instead.
set -euo pipefail
cd "$(dirname "$0")/.."
SUPPORTED=(3.10 3.11 3.12 3.13)  # pyproject's requires-python and the classifiers say the same
SUBSET=(tests/test_processing_image.py tests/test_processing_audio.py tests/test_processing_video.py
        tests/test_processing_corrupt_media.py tests/test_serving_demo.py)
default=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
missing=()
for version in "${SUPPORTED[@]}"; do
  [ "$version" = "$default" ] && continue
  if ! PYTHON=python$version bash scripts/setup.sh --check-python 2>/dev/null; then
    echo "python$version: not on this machine, left out"
    missing+=("$version")
    continue
  fi
  echo "python$version: set-up and subset"
  PYTHON=python$version VENV=.venv-py$version bash scripts/setup.sh
  .venv-py$version/bin/python -c 'import av, torch, transformers, PIL; print("  PyAV", av.__version__, "torch", torch.__version__, "transformers", transformers.__version__, "Pillow", PIL.__version__)'
  .venv-py$version/bin/python -m pytest -q -p no:cacheprovider "${SUBSET[@]}"
done
if [ ${#missing[@]} -gt 0 ] && [ "${MIMO_REQUIRE_PYTHONS:-0}" = 1 ]; then
  echo "missing Pythons: ${missing[*]}" >&2
  exit 1
fi
