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
    assert frames[0].shape[:2] == (288, 288) and len(frames) > 10  # 48x48 frames upscaled 6x to >= 256 px
    tp = s["throughput"]
    assert tp["episodes_run"] == 9 and tp["episodes_per_min"] > 0


def test_random_policy_scores_near_zero(tmp_path):
    s = evaluate(["env=metaworld", "env.tasks=[reach-v3,button-press-v3,pick-place-v3]", "env.image_size=[32,32]",
                  "policy=random", "episodes_per_task=2", "max_episode_steps=100", "workers=0", "videos_per_task=0",
                  f"out_dir={tmp_path}", "progress=false"])
    assert s["episodes"] == 6 and s["mean_success"] <= 0.2
    assert all(t["mean_steps"] >= 50 for t in s["tasks"].values())  # random rarely ends early


def test_evaluation_env_follows_the_store_a_policy_trained_on(tmp_path):
    """`collect out=DIR` then `finetune dataset=store data_dir=DIR`: evaluate must roll out with the
    store's tasks, image size, camera, action repeat and state (it fell back to MT10 at 128x128)."""
    from selfflow_robot.collect import _episode_meta
    from selfflow_robot.evaluation.training_env import match_training_env
    from selfflow_robot.jobs import metaworld_settings

    meta = _episode_meta((64, 64), "corner2", 4, ["reach-v3", "drawer-close-v3"], "full")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "config.json").write_text(json.dumps({"dataset": {"source": "store"}, "io": {"state_dim": 39},
                                                  "data": {"metaworld": metaworld_settings(meta)}}))
    nulls = dict.fromkeys(("tasks", "camera", "action_repeat", "image_size", "state_mode", "include_state"))
    env = match_training_env({"env": {"name": "metaworld", **nulls}, "policy": str(ckpt)})["env"]
    assert env == {"name": "metaworld", "tasks": ["reach-v3", "drawer-close-v3"], "camera": "corner2",
                   "action_repeat": 4, "image_size": [64, 64], "state_mode": "full", "include_state": True}
    explicit = match_training_env({"env": {"name": "metaworld", **nulls, "tasks": ["reach-v3"]},
                                   "policy": str(ckpt)})["env"]
    assert explicit["tasks"] == ["reach-v3"]  # explicit values win


def test_a_served_policy_says_how_it_was_trained(tmp_path, caplog):
    """evaluate policy=ws://... rolls out as the served checkpoint's demos were collected (it used
    action_repeat 1, 4x the control rate, before the server sent its training env)."""
    import logging

    from selfflow_robot.collect import _episode_meta
    from selfflow_robot.evaluation.training_env import match_training_env
    from selfflow_robot.jobs import metaworld_settings
    from selfflow_robot.policies.policy import metadata_from_config
    from selfflow_robot.policies.server import PolicyServer

    meta = _episode_meta((64, 64), "corner2", 4, ["reach-v3"], "full")
    run_cfg = {"model": {"name": "tiny"}, "dataset": {"source": "store"}, "data": {"metaworld": metaworld_settings(meta)},
               "io": {"action_dim": 4, "state_dim": 39, "image_size": [64, 64]}}
    served_meta = metadata_from_config(run_cfg)
    assert served_meta["training_env"]["metaworld"]["action_repeat"] == 4

    class Served:
        metadata = served_meta

        def reset(self, instruction=None):
            pass

    nulls = dict.fromkeys(("tasks", "camera", "action_repeat", "image_size", "state_mode", "include_state"))
    envs = []
    for policy_meta in (served_meta, {"action_dim": 4}):
        Served.metadata = policy_meta
        server = PolicyServer(Served(), host="127.0.0.1", port=0, api_key="k")
        port = server.start_in_thread()
        try:
            with caplog.at_level(logging.WARNING, logger="selfflow_robot"):
                env = match_training_env({"env": {"name": "metaworld", **nulls}, "policy": f"ws://127.0.0.1:{port}",
                                          "api_key": "k"})["env"]
        finally:
            server.stop()
        envs.append(env)
    assert envs[0] == {"name": "metaworld", "tasks": ["reach-v3"], "camera": "corner2", "action_repeat": 4,
                       "image_size": [64, 64], "state_mode": "full", "include_state": True}
    assert envs[1]["action_repeat"] == 1 and envs[1]["tasks"] == "mt10"  # an older server: defaults, and a warning
    assert "does not say which Meta-World settings" in caplog.text


def test_a_mistyped_task_or_episode_count_fails_before_anything_is_written(tmp_path):
    """reach-v2 used to fail inside every episode, after run.json was written (so the corrected
    command was refused as 'a different run'); episodes_per_task=0 silently ran 10 episodes."""
    out = tmp_path / "eval"
    base = ["env=metaworld", "policy=expert", "workers=0", "max_episode_steps=2", "videos_per_task=0",
            f"out_dir={out}", "progress=false"]
    with pytest.raises(ValueError, match="unknown Meta-World task 'reach-v2'; did you mean reach-v3"):
        evaluate(base + ["env.tasks=[reach-v2]", "episodes_per_task=1"])
    for n in (0, -1):
        with pytest.raises(ValueError, match=f"episodes_per_task={n}"):
            evaluate(base + ["env.tasks=[reach-v3]", f"episodes_per_task={n}"])
    assert not out.exists()
    from selfflow_robot.evaluation.episodes import build_episodes
    assert len(build_episodes({"env": {"name": "metaworld", "tasks": ["reach-v3"]}, "episodes_per_task": None})) == 10
