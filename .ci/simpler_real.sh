#!/usr/bin/env bash
# CI, SIMPLER part (issue 17): the real SIMPLER in its own venv, from the upstream tarballs beside the
# checkout, with software Vulkan on CPU; then the real-backend tests (tests/test_simpler_real.py).
# Run from the main venv (the tests serve a policy from it). Prints how long the part took.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${SIMPLER_SOURCES:-../shared/third_party/simpler}"
t0=$SECONDS
if [ -d "$SRC" ]; then
  scripts/install_simpler.sh --from "$SRC" 2>&1 | grep -v "^WARNING: Location"
  status=0
  python -m pytest -q -rs -s tests/test_simpler_real.py || status=$?
else
  echo "SIMPLER: $SRC is absent; tests/test_simpler_real.py skips"
  status=0
fi
echo "SIMPLER part (install + real-backend tests): $((SECONDS - t0)) s on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$status"
