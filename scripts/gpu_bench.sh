#!/usr/bin/env bash
# GPU benchmark job: the shared plain reference (reference_dit.py) and the project's own figures,
# on the same card in the same job. Usage on a GPU machine, from the repo root:
#   REFERENCE=path/to/reference_dit.py OUT=results bash scripts/gpu_bench.sh [train|sample|all]
# Needs: torch with CUDA, and this package installed (pip install --no-deps -e .).
set -uo pipefail
what=${1:-all}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
python3 -m selfflow_robot.bench params model=xl
if [[ $what == train || $what == all ]]; then
  if [[ -n ${REFERENCE:-} ]]; then
    OUT=$OUT python3 "$REFERENCE" --quick   # writes $OUT/gpu_anchor.json
  fi
  python3 -m selfflow_robot.bench train model=xl train.out="$OUT/bench_train.jsonl"
fi
if [[ $what == sample || $what == all ]]; then
  # XL policy: 256x320 frames in 16x16 pixel patches (320 tokens per frame), 6-action chunk, 10 Euler steps.
  python3 -m selfflow_robot.bench sample model=xl model.patch_size=16 'sample.compile=[false]' sample.out="$OUT/bench_sample.jsonl"
  python3 -m selfflow_robot.bench sample model=xl model.patch_size=16 'sample.compile=[true]' 'sample.modes=[action_first]' sample.out="$OUT/bench_sample.jsonl"
fi
