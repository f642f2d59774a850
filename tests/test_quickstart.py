"""`python -m selfflow_robot.quickstart` end to end on a reduced configuration (fresh data cache)."""
import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_runs_every_stage_and_prints_the_table(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "WANDB_MODE": "disabled", "MUJOCO_GL": "egl", "SELFFLOW_DATA_CACHE": str(tmp_path / "cache")}
    args = ["tasks=[reach-v3]", "episodes_per_task=2", "image_size=[32,32]", "model.depth=2", "model.width=32",
            "model.patch_size=8", "pretrain.steps=2", "pretrain.batch_size=4", "finetune.steps=2",
            "finetune.batch_size=4", "evaluate.episodes_per_task=1", "evaluate.workers=0",
            "evaluate.max_episode_steps=4", f"out_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "selfflow_robot.quickstart", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"\| reach-v3 \| [01]/1 \| \d+% \|", proc.stdout), proc.stdout
    assert "**mean**" in proc.stdout and str(out / "quickstart.json") in proc.stdout
    result = json.loads((out / "quickstart.json").read_text())
    assert set(result["tasks"]) == {"reach-v3"} and 0.0 <= result["mean_success"] <= 1.0
    assert result["demos"] == 2 and result["times"]["total_s"] > 0
    for stage in ("pretrain", "finetune"):
        assert os.path.isfile(os.path.join(result[stage]["checkpoint"], "model.safetensors"))
        assert result[stage]["checkpoint"].startswith(str(out / stage))
    assert (out / "collect" / "index.json").is_file()  # fresh collection inside out_dir
    for name in ("summary.md", "summary.json", "success.png"):
        assert (out / "eval" / name).is_file()
    assert list((out / "eval" / "videos").rglob("*.mp4"))
    # the policy was fine-tuned from the pretrained backbone and conditions on hand xyz + gripper
    cfg = json.loads(open(os.path.join(result["finetune"]["checkpoint"], "config.json")).read())
    assert cfg["init"] == str(out / "pretrain") and cfg["io"]["state_dim"] == 4
