#!/usr/bin/env bash
# GPU job: the shared plain reference (reference_dit.py) and the project's own figures, on the
# same card in the same job. On a GPU machine, from the repo root:
#   REFERENCE=path/to/reference_dit.py OUT=results bash scripts/gpu_bench.sh [train|sample|policy|study|all]
# Needs torch with CUDA and this package (pip install --no-deps -e .). On the workplace's lent GPU
# (no network), first run scripts/gpu_prepare.sh here, carry [".whl", ".gpu"], and begin with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site && python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
#     && REFERENCE=.gpu/reference_dit.py OUT=$OUT bash scripts/gpu_bench.sh all
# Stages (one H200, estimated): train ~4 min, sample ~1.5 min, policy ~1 min, study ~6 min (capped).
set -uo pipefail
what=${1:-all}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
want() { [[ $what == all || $what == "$1" ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
python3 -m selfflow_robot.bench params model=xl
if want train; then
  if [[ -n ${REFERENCE:-} ]]; then
    OUT=$OUT python3 "$REFERENCE" --quick   # writes $OUT/gpu_anchor.json
  fi
  python3 -m selfflow_robot.bench train model=xl train.out="$OUT/bench_train.jsonl"
fi
if want sample; then
  # XL policy: 256x320 frames in 16x16 pixel patches (320 tokens per frame), 6-action chunk, 10 Euler steps.
  python3 -m selfflow_robot.bench sample model=xl model.patch_size=16 'sample.compile=[false]' sample.out="$OUT/bench_sample.jsonl"
  python3 -m selfflow_robot.bench sample model=xl model.patch_size=16 'sample.compile=[true]' 'sample.modes=[action_first]' sample.out="$OUT/bench_sample.jsonl"
fi
if want policy; then
  # The whole Policy (resize, sampler, un-normalisation, safety) and the loopback server overhead.
  python3 -m selfflow_robot.bench policy policy_bench.random_model=xl 'policy_bench.compile=[false,true]' \
    'policy_bench.modes=[action_first]' policy_bench.iters=100 policy_bench.out="$OUT/bench_policy.jsonl"
fi
if want study; then
  # Self-Flow vs DTS vs flow matching on Meta-World (docs/study.md, GPU configuration), capped at
  # STUDY_MINUTES; runs.json under $OUT is rewritten after each run, so a capped study still reports.
  MUJOCO_GL=egl timeout "$(( ${STUDY_MINUTES:-6} * 60 ))" python3 -m selfflow_robot.study device=cuda \
    collect_workers=12 evaluate.workers=12 model.name=s model.depth=12 model.width=384 model.heads=6 \
    model.patch_size=16 image_size=[128,128] episodes_per_task=40 batch_size=64 steps=${STUDY_STEPS:-1500} \
    lr=3e-4 ema_decay=0.999 checkpoint_every=500 validation.every=250 validation.batches=8 \
    seeds=${STUDY_SEEDS:-[0,1]} evaluate.episodes_per_task=10 out_dir="$OUT/study_gpu" 2>&1 | grep -v "it/s\]$" | tail -60
fi
