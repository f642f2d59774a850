#!/usr/bin/env bash
# GPU job: the shared plain reference (reference_dit.py) and the project's own figures, on the
# same card in the same job. On a GPU machine, from the repo root:
#   REFERENCE=path/to/reference_dit.py OUT=results bash scripts/gpu_bench.sh [reference|train|attention|checkpointing|small|sample|policy|study|dist|latents|all ...]
# Needs torch with CUDA and this package (pip install --no-deps -e .). On the workplace's lent GPU
# (no network), run scripts/gpu_prepare.sh here first, then scripts/gpu_lease.sh there (it installs
# the carried wheels and runs these stages one by one under time caps).
# Stages: reference, train, attention, checkpointing and small (new, untimed), sample, policy (measured
# on one H100, 2026-11-26: 130, 162, 73 for two kernels, 150 and 132 s, mostly compilation; the
# reference needs > 110 s), study (capped at STUDY_MINUTES, default 6), dist and latents (new,
# untimed). pstudy is named only (it fills a run). Pass several: gpu_bench.sh reference train. Run
# reference and train on the same warm machine (one card).
# DRY=1 runs every stage on a tiny model on the CPU in about a minute (tests/test_gpu_script.py),
# so a broken argument never costs device time.
set -uo pipefail
stages=" ${*:-all} "
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
PY=${PYTHON:-python3}
MODEL=xl STUDY_DEVICE=cuda ATTENTION_KERNELS=${ATTENTION_KERNELS:-"auto flash cudnn"} TRAIN_X=() SAMPLE_X=() POLICY_X=() STUDY_X=() PSTUDY_X=() DIST_X=() LATENTS_X=()
if [[ ${DRY:-0} == 1 ]]; then  # same commands and keys, CPU-sized; later overrides win
  MODEL=tiny STUDY_DEVICE=cpu REFERENCE= ATTENTION_KERNELS=flash
  TRAIN_X=(train.device=cpu train.compile=false train.warmup=1 train.reps=1 'train.cases=[{name:dry,frames:2,grid:4,batch:2}]')
  SAMPLE_X=(sample.device=cpu sample.warmup=1 sample.reps=1 'sample.image_size=[32,32]' 'sample.camera_size=[32,32]')
  POLICY_X=(policy_bench.device=cpu policy_bench.iters=3 policy_bench.warmup=1 'policy_bench.image_size=[32,32]')
  STUDY_X=('tasks=[reach-v3]' episodes_per_task=2 'image_size=[32,32]' model.name=tiny model.depth=2 model.width=32
           model.heads=2 model.patch_size=8 'seeds=[0]' steps=2 batch_size=2 checkpoint_every=2 validation.every=2
           validation.batches=1 validation.fraction=0.5 evaluate.episodes_per_task=1 evaluate.workers=0
           evaluate.max_episode_steps=2 collect_workers=0 parallel_arms=2
           "overrides=['trainer.compile=false']")
  LATENTS_X=(latents.device=cpu latents.compile=false 'latents.image_size=[64,80]' latents.batch=2 'latents.workers=[0,1]'
             latents.loader_batches=2 latents.warmup=1 latents.reps=1 latents.episodes=2 latents.steps_per_episode=8)
  DIST_X=(model=tiny trainer.device=cpu 'dataset.image_size=[32,32]' 'clip.image_size=[32,32]' trainer.batch_size=2)
  PSTUDY_X=(device=cpu model.name=tiny 'corpus.tasks=[reach-v3]' corpus.episodes_per_task=2 'target.tasks=[reach-v3]' 'target.demos=[2]'
            'pretrain.overrides=[]' 'finetune.overrides=[]'
            heldout.episodes_per_task=2 'image_size=[32,32]' model.depth=2 model.width=32 model.heads=2 model.patch_size=8
            'arms=[none,flow_matching]' pretrain.steps=2 pretrain.batch_size=2 pretrain.checkpoint_every=2
            pretrain.validation_every=2 pretrain.validation_batches=1 pretrain.ema_decay=0 finetune.steps=2
            finetune.batch_size=2 finetune.checkpoint_every=2 finetune.validation_every=2 finetune.validation_batches=1
            finetune.validation_fraction=0.5 finetune.ema_decay=0 evaluate.episodes_per_task=1 evaluate.workers=0
            evaluate.max_episode_steps=2 evaluate.checkpoints=last rollout.episodes=1 rollout.chunks=1 rollout.steps=2
            collect_workers=0)
fi
want() { [[ $stages == *" all "* || $stages == *" $1 "* ]]; }
named() { [[ $stages == *" $1 "* ]]; }  # stages that "all" leaves out (they fill a whole GPU run)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
$PY -m selfflow_robot.bench params model=$MODEL || exit 1
if want reference && [[ -n ${REFERENCE:-} ]]; then
  OUT=$OUT $PY "$REFERENCE" --quick   # writes $OUT/gpu_anchor.json
fi
if want train; then
  # self_flow_fp8 runs the teacher's matmuls in FP8 (add dts to separate the two-slot modulation cost).
  $PY -m selfflow_robot.bench train model=$MODEL "train.objectives=${TRAIN_OBJECTIVES:-[flow_matching,self_flow,self_flow_fp8]}" \
    train.out="$OUT/bench_train.jsonl" train.profile="$OUT/profile" "${TRAIN_X[@]}"
fi
if want attention; then
  # Flow matching at 1536 tokens (where attention is ~18% of the FLOPs), a fresh process per SDPA
  # kernel: auto (cuDNN on the H100) and each forced; head dim 72: FlashAttention runs its 96 kernel.
  for kernel in $ATTENTION_KERNELS; do
    $PY -m selfflow_robot.bench train model=$MODEL 'train.objectives=[flow_matching]' train.attention=$kernel \
      'train.cases=[{name:video1536,frames:6,grid:16,batch:16}]' \
      train.out="$OUT/bench_train.jsonl" "${TRAIN_X[@]}" || echo "attention=$kernel failed"
  done
fi
if want checkpointing; then
  # Activation checkpointing at 1536 tokens: step time against the train stage's flow matching, and
  # the peak memory of batch 16 and of a batch 4x larger (bench memory gives the estimate).
  $PY -m selfflow_robot.bench train model=$MODEL 'train.objectives=[flow_matching]' train.activation_checkpointing=true \
    'train.cases=[{name:video1536,frames:6,grid:16,batch:16},{name:video1536_b64,frames:6,grid:16,batch:64}]' \
    train.out="$OUT/bench_train.jsonl" "${TRAIN_X[@]}"
fi
if want small; then
  # The GPU study's model (s, 33M) at its shape (3 frames of 8x8 patches, batch 64), eager and
  # compiled: does compiling the blocks pay for the study (docs/study.md)?
  for compile in false true; do
    $PY -m selfflow_robot.bench train model=s model.patch_size=16 'train.objectives=[flow_matching,dts,self_flow]' \
      train.compile=$compile 'train.cases=[{name:study_s,frames:3,grid:8,batch:64}]' \
      train.out="$OUT/bench_train.jsonl" "${TRAIN_X[@]}" || echo "small compile=$compile failed"
  done
fi
if want sample; then
  # XL policy: 256x320 frames in 16x16 pixel patches (320 tokens per frame), 6-action chunk, 10 Euler steps.
  $PY -m selfflow_robot.bench sample model=$MODEL model.patch_size=16 'sample.compile=[false]' \
    sample.out="$OUT/bench_sample.jsonl" "${SAMPLE_X[@]}"
  $PY -m selfflow_robot.bench sample model=$MODEL model.patch_size=16 'sample.compile=[true]' 'sample.modes=[action_first]' \
    sample.out="$OUT/bench_sample.jsonl" "${SAMPLE_X[@]}"
fi
if want policy; then
  # The whole Policy (resize, sampler, un-normalisation, safety) and the loopback server overhead.
  $PY -m selfflow_robot.bench policy policy_bench.random_model=$MODEL 'policy_bench.compile=[false,true]' \
    'policy_bench.modes=[action_first]' policy_bench.iters=100 policy_bench.out="$OUT/bench_policy.jsonl" "${POLICY_X[@]}"
fi
if want latents; then
  # Training on SD-VAE latents of RT-1-sized frames (256x320 -> 32x40x4, patch 2): the store -> loader
  # rate per worker count, the SD-VAE encoder's rate, encoding the store once (clip.cached_latents) and
  # the cached store -> loader rate, and the XL step from frames (encoder inside) and from the cached
  # latents; the summary says how many workers keep each fed.
  $PY -m selfflow_robot.bench latents model=$MODEL "latents.workers=${LATENTS_WORKERS:-[0,2,4,8,12]}" \
    latents.out="$OUT/bench_latents.jsonl" "${LATENTS_X[@]}" || echo "latents failed"
fi
egl_setup() {  # EGL loaders for MuJoCo's headless rendering (gpu_prepare.sh)
  if [[ ${DRY:-0} != 1 && -d .gl ]]; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
    egl_ok() { MUJOCO_GL=egl $PY -c "import mujoco; mujoco.GLContext(64, 64).make_current()" 2>/dev/null; }
    vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json  # where the lent machines keep it
    if ! egl_ok && [[ -f $vendor ]]; then export __EGL_VENDOR_LIBRARY_FILENAMES=$vendor; fi
    egl_ok && echo "EGL ok ${__EGL_VENDOR_LIBRARY_FILENAMES:-}" || echo "EGL context failed: the study cannot render"
  fi
}
if want study; then
  egl_setup
  # Self-Flow vs DTS vs flow matching on Meta-World (docs/study.md, GPU configuration), capped at
  # STUDY_MINUTES; three arms train at once (one process each); runs.json under $OUT is rewritten as
  # each run ends, so a capped study keeps whole seeds (python -m selfflow_robot.study_report rebuilds
  # or merges reports). The first H100 run (eager) trained at ~5.5 steps/s per arm, 4% MFU: the
  # small model is launch-bound, hence STUDY_COMPILE (per-block torch.compile) by default now.
  MUJOCO_GL=egl timeout "$(( ${STUDY_MINUTES:-6} * 60 ))" $PY -m selfflow_robot.study device=$STUDY_DEVICE \
    collect_workers=12 evaluate.workers=4 parallel_arms=3 model.name=s model.depth=12 model.width=384 \
    model.heads=6 model.patch_size=16 'image_size=[128,128]' episodes_per_task=40 batch_size=64 \
    steps=${STUDY_STEPS:-1500} lr=3e-4 ema_decay=0.998 checkpoint_every=500 validation.every=250 validation.batches=8 \
    "seeds=${STUDY_SEEDS:-[0,1,2]}" evaluate.episodes_per_task=10 "overrides=['trainer.compile=${STUDY_COMPILE:-true}']" \
    out_dir="$OUT/study_gpu" "${STUDY_X[@]}" 2>&1 \
    | grep -v "it/s\]$" > "$OUT/study_full.log"
  echo "study rc=${PIPESTATUS[0]} (124: stopped at STUDY_MINUTES)"
  tail -60 "$OUT/study_full.log"
  # Only a few files, two folders deep, come back from the lent machine: one archive, no checkpoints.
  if [[ -d $OUT/study_gpu ]]; then
    tar czf "$OUT/study_gpu.tgz" --exclude=checkpoints -C "$OUT" study_gpu || exit 1
    if [[ ${DRY:-0} != 1 ]]; then rm -rf "$OUT/study_gpu"; fi
  fi
fi
if want dist; then
  egl_setup
  # The multi-GPU path on one GPU: torchrun (nccl on CUDA, gloo in DRY) runs finetune and pretrain
  # under DDP and FSDP2 for DIST_STEPS, then resumes each run to twice that. $OUT/dist.jsonl gets one
  # line per run (scripts/check_resume.py: the checkpoint's parallel mode and world size, and a
  # metrics log whose steps continue the first run's instead of restarting).
  S=${DIST_STEPS:-20}; [[ ${DRY:-0} == 1 ]] && S=2
  mkdir -p "$OUT/dist"
  for job in finetune pretrain; do
    for parallel in ddp fsdp; do
      run=$OUT/dist/${job}_$parallel
      for steps in $S $((2 * S)); do
        MUJOCO_GL=egl $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m selfflow_robot.$job \
          model=s dataset=metaworld 'dataset.tasks=[reach-v3]' dataset.episodes_per_task=4 \
          dataset.store_dir="$OUT/dist/data" dataset.workers=0 trainer.parallel=$parallel trainer.steps=$steps \
          trainer.batch_size=8 trainer.checkpoint_every=$S trainer.log_every=1 trainer.num_workers=0 \
          logger.progress_bar=false run_dir="$run" resume=true "${DIST_X[@]}" > "$run.log" 2>&1 \
          || { echo "dist $job $parallel to step $steps failed:"; tail -20 "$run.log"; }
      done
      $PY "$(dirname "$0")/check_resume.py" "$run" --steps $S $((2 * S)) --parallel $parallel >> "$OUT/dist.jsonl"
    done
  done
  cat "$OUT/dist.jsonl"
fi
if named pstudy; then
  # The pretraining study's GPU configuration (docs/study.md): one seed (PSTUDY_SEED, default 0) per
  # 15-minute GPU run, capped at PSTUDY_MINUTES (default 13); runs.json keeps every finished arm.
  # Merge the runs here: python -m selfflow_robot.pretraining_study_report DIR DIR ... --out OUT.
  egl_setup
  MUJOCO_GL=egl timeout "$(( ${PSTUDY_MINUTES:-13} * 60 ))" $PY -m selfflow_robot.pretraining_study study_size=gpu \
    "seeds=[${PSTUDY_SEED:-0}]" out_dir="$OUT/pstudy_seed${PSTUDY_SEED:-0}" "${PSTUDY_X[@]}" 2>&1 \
    | grep -v "it/s\]$" > "$OUT/pstudy_full.log"
  echo "pstudy rc=${PIPESTATUS[0]} (124: stopped at PSTUDY_MINUTES)"
  tail -60 "$OUT/pstudy_full.log"
  d=pstudy_seed${PSTUDY_SEED:-0}
  if [[ -d $OUT/$d ]]; then  # one archive, no checkpoints or data stores
    tar czf "$OUT/$d.tgz" --exclude=checkpoints --exclude="$d/data" -C "$OUT" "$d" || exit 1
    if [[ ${DRY:-0} != 1 ]]; then rm -rf "${OUT:?}/$d"; fi
  fi
fi
