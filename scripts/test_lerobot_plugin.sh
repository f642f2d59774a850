#!/usr/bin/env bash
# The LeRobot plugin against the real LeRobot 0.6 in its own Python 3.12 venv (LeRobot needs
# Python >= 3.12 and torch < 2.12, so it cannot share the project's venv):
#   1. build the venv (once; reused while it exists): lerobot[pusht], selfflow-robot (--no-deps, plus the
#      few packages its model code imports) and integrations/lerobot, all editable;
#   2. the plugin tests (integrations/lerobot/tests): factory loading + parity with Policy.load,
#      processor JSON, the training loss and EMA update, feature errors;
#   3. lerobot-eval --policy.path=<exported tiny policy> in gym-pusht for a few short episodes;
#   4. lerobot-train --policy.type=selfflow for a few steps on a tiny LeRobotDataset that LeRobot writes,
#      then lerobot-eval of that checkpoint for one episode.
# Env: LEROBOT_VENV (default .venv-lerobot), PYTHON312 (a python3.12), EPISODES (2), EPISODE_LENGTH (30).
# Output: the last lines say PASS/FAIL with the timings; docs/serving.md records the last result.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${LEROBOT_VENV:-$ROOT/.venv-lerobot}
EPISODES=${EPISODES:-2}
EPISODE_LENGTH=${EPISODE_LENGTH:-30}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 MUJOCO_GL=${MUJOCO_GL:-egl}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled  # nothing is fetched at run time

find_python312() {
  for p in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    # (a pyenv shim exists even where that version is not selected: run it to be sure)
    if [ -n "$p" ] && "$p" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; then
      command -v "$p"; return 0
    fi
  done
  echo "no python3.12 found: set PYTHON312=/path/to/python3.12 (LeRobot 0.6 needs Python >= 3.12)" >&2
  return 1
}

t0=$(date +%s)
if [ ! -x "$VENV/bin/lerobot-eval" ]; then
  PY=$(find_python312)
  echo "== building $VENV with $PY"
  "$PY" -m venv "$VENV"
  # PyPI's Linux torch < 2.12 is the CUDA build (its nvidia-* wheels come along, ~2.5 GB); CPU-only
  # wheels live on another index this project does not reach.
  "$VENV/bin/pip" install -q "lerobot[pusht,training]==0.6.1" pytest pytest-timeout
  "$VENV/bin/pip" install -q --no-deps -e "$ROOT" -e "$ROOT/integrations/lerobot"
  "$VENV/bin/pip" install -q einops hydra-core omegaconf msgpack websockets imageio imageio-ffmpeg
fi
t1=$(date +%s)
echo "== venv ready in $((t1 - t0)) s ($(du -sh "$VENV" | cut -f1)); $("$VENV/bin/python" -c 'import lerobot, torch; print("lerobot", lerobot.__version__, "torch", torch.__version__)')"

"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/integrations/lerobot/tests" -s 2>&1 | tee "${TMPDIR:-/tmp}/lerobot_plugin_pytest.log"
t2=$(date +%s)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# A gym-pusht-shaped policy: one camera (observation.image), state = agent position, action = target
# position, both in the 0..512 pixel frame.
"$VENV/bin/python" - "$WORK" <<'PY'
import sys
sys.path.insert(0, "integrations/lerobot/tests")
from tiny_checkpoint import tiny_checkpoint
from selfflow_robot.export_lerobot import export_lerobot
ckpt = tiny_checkpoint(f"{sys.argv[1]}/ckpt", action_dim=2, state_dim=2, image_size=(32, 32), action_chunk=8,
                       action_q=([0.0, 0.0], [512.0, 512.0]), state_q=([0.0, 0.0], [512.0, 512.0]),
                       action_mask=[True, True], state_mask=[True, True])
export_lerobot(ckpt, f"{sys.argv[1]}/pusht_policy", camera="observation.image", sampler_steps=4)
PY
"$VENV/bin/lerobot-eval" --policy.path="$WORK/pusht_policy" --policy.device=cpu --env.type=pusht \
  --env.episode_length="$EPISODE_LENGTH" --eval.n_episodes="$EPISODES" --eval.batch_size=1 \
  --output_dir="$WORK/eval" > "$WORK/eval.log" 2>&1 || { tail -40 "$WORK/eval.log"; echo "FAIL: lerobot-eval"; exit 1; }
t3=$(date +%s)
"$VENV/bin/python" - "$WORK/eval" <<'PY'
import glob, json, sys
info = json.load(open(glob.glob(f"{sys.argv[1]}/**/eval_info.json", recursive=True)[0]))
agg = info.get("overall") or info.get("aggregated") or {}
n = len(info.get("per_episode") or []) or agg.get("n_episodes")
print(f"lerobot-eval pusht: {n} episodes, " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in agg.items() if not isinstance(v, (list, dict))))
PY

"$VENV/bin/python" integrations/lerobot/tests/make_dataset.py "$WORK/dataset" > "$WORK/dataset.log" 2>&1 \
  || { tail -20 "$WORK/dataset.log"; echo "FAIL: writing the LeRobotDataset"; exit 1; }
"$VENV/bin/lerobot-train" --dataset.repo_id=local/selfflow_tiny --dataset.root="$WORK/dataset" \
  --policy.type=selfflow --policy.device=cpu --policy.push_to_hub=false --policy.image_size='[32,32]' \
  --policy.context_frames=2 --policy.future_frames=1 --policy.chunk_size=4 --policy.n_action_steps=4 \
  --steps=4 --batch_size=2 --num_workers=0 --save_freq=4 --log_freq=1 --wandb.enable=false \
  --output_dir="$WORK/train" > "$WORK/train.log" 2>&1 || { tail -40 "$WORK/train.log"; echo "FAIL: lerobot-train"; exit 1; }
grep -o "step:4 .*" "$WORK/train.log" | sed 's/^/lerobot-train: /'
"$VENV/bin/lerobot-eval" --policy.path="$WORK/train/checkpoints/last/pretrained_model" --policy.device=cpu \
  --env.type=pusht --env.episode_length=10 --eval.n_episodes=1 --eval.batch_size=1 \
  --output_dir="$WORK/eval_trained" > "$WORK/eval_trained.log" 2>&1 \
  || { tail -40 "$WORK/eval_trained.log"; echo "FAIL: lerobot-eval of the lerobot-train checkpoint"; exit 1; }
t4=$(date +%s)
echo "PASS: plugin tests $((t2 - t1)) s, lerobot-eval $((t3 - t2)) s, lerobot-train + eval $((t4 - t3)) s, venv $((t1 - t0)) s"
