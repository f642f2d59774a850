"""Real Meta-World rollouts through the harness: experts succeed, random actions do not."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before MuJoCo is imported: it picks its GL backend then
pytest.importorskip("metaworld")

from selfflow_robot.evaluate import evaluate  # noqa: E402

pytestmark = pytest.mark.sim
TASKS = ["reach-v3", "drawer-close-v3", "button-press-v3"]


def test_expert_solves_reach_drawer_close_button_press(tmp_path):
    s = evaluate(["env=metaworld", f"env.tasks=[{','.join(TASKS)}]", "env.image_size=[48,48]", "policy=expert",
                  "episodes_per_task=3", "max_episode_steps=120", "workers=2", f"out_dir={tmp_path}", "progress=false"])
    assert s["complete"] and s["episodes"] == 9
    for task in TASKS:
        assert s["tasks"][task]["success_rate"] >= 0.8, (task, s["tasks"][task])
    recs = [json.loads(line) for line in open(tmp_path / "records" / "rank000.jsonl")]
    assert len(recs) == 9 and len({r["key"] for r in recs}) == 9
    assert {"task", "variant", "seed", "episode_id", "success", "steps", "instruction"} <= set(recs[0])
    assert {r["instruction"] for r in recs if r["task"] == "reach-v3"} == {"reach the goal position"}
    for name in ("summary.md", "summary.csv", "summary.json", "success.png"):
        assert (tmp_path / name).stat().st_size > 0
    videos = [r["video"] for r in recs if "video" in r]
    assert len(videos) == 3 and all((tmp_path / v).stat().st_size > 1000 for v in videos)
    import imageio.v2 as imageio
    frames = imageio.mimread(tmp_path / videos[0])
    assert frames[0].shape[:2] == (48, 48) and len(frames) > 10
    tp = s["throughput"]
    assert tp["episodes_run"] == 9 and tp["episodes_per_min"] > 0


def test_random_policy_scores_near_zero(tmp_path):
    s = evaluate(["env=metaworld", "env.tasks=[reach-v3,button-press-v3,pick-place-v3]", "env.image_size=[32,32]",
                  "policy=random", "episodes_per_task=2", "max_episode_steps=100", "workers=0", "videos_per_task=0",
                  f"out_dir={tmp_path}", "progress=false"])
    assert s["episodes"] == 6 and s["mean_success"] <= 0.2
    assert all(t["mean_steps"] >= 50 for t in s["tasks"].values())  # random rarely ends early
