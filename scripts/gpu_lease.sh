#!/usr/bin/env bash
# The GPU job on the workplace's lent machine (no network, results only from $OUT, a few files):
# installs the carried wheels and this package, then runs gpu_bench.sh stage by stage, each under
# its own time cap so that one slow stage cannot cost the others, with each stage's log and the
# profile tables (as one archive) left in $OUT. Prepare with scripts/gpu_prepare.sh here, then:
#   run(command="bash scripts/gpu_lease.sh sample:200 policy:150 reference:190 train:330",
#       carry=[".whl", ".gpu", ".gl"], timeout_s=...)
set -uo pipefail
OUT=${OUT:?set OUT to the folder whose files come back}
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || { echo "editable install failed"; exit 1; }
echo "install $(( $(date +%s) - t0 )) s"
for spec in "$@"; do  # stage:seconds
  stage=${spec%%:*} cap=${spec##*:}
  s=$(date +%s)
  echo "=== $stage (cap ${cap} s) at +$(( s - t0 )) s"
  REFERENCE=.gpu/reference_dit.py OUT=$OUT timeout "$cap" bash scripts/gpu_bench.sh "$stage" 2>&1 \
    | grep -v "it/s\]$" | tee -a "$OUT/log_$stage.txt"
  echo "=== $stage rc=${PIPESTATUS[0]} (124: over its cap) in $(( $(date +%s) - s )) s"
done
if [[ -d $OUT/profile ]]; then tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$OUT/profile"; fi
echo "total $(( $(date +%s) - t0 )) s"
