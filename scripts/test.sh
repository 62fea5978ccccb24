#!/usr/bin/env bash
# The tests (after scripts/setup.sh): the full suite on .venv's Python while the other supported Pythons' venvs are
# set up beside it at low CPU priority (downloads, numpy 1.26's build on 3.13), then each other Python's subset
# (scripts/test-other-pythons.sh). Arguments go to the full suite's pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache
# its own process group (setsid), so that a failed suite stops the whole set-up instead of waiting for it
setsid nice -n 19 bash scripts/test-other-pythons.sh --setup-only > .cache/other-pythons-setup.log 2>&1 &
setup=$!
.venv/bin/python -m pytest -q --durations=25 "$@"  # the slowest tests, for whoever keeps CI short
suite=$?
if [ $suite != 0 ]; then
  kill -TERM -- -$setup 2>/dev/null
  wait $setup
  echo "--- the suite failed: the other Pythons' set-up was stopped (their venvs are made again next time)"
  exit $suite
fi
wait $setup
prepared=$?
echo "--- other Pythons' set-up (beside the suite):"
cat .cache/other-pythons-setup.log
[ $prepared = 0 ] || exit $prepared
exec bash scripts/test-other-pythons.sh
