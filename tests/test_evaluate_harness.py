"""Harness mechanics on the SIMPLER test double: records, resume, sharding, summaries, CLI, client."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DOUBLE = str(Path(__file__).resolve().parent / "simpler_double")
sys.path.insert(0, DOUBLE)

from selfflow_robot.evaluate import evaluate  # noqa: E402
from selfflow_robot.evaluation.records import load_records, rank_file  # noqa: E402

SIM = ["env=simpler", "env.backend=fake_simpler_env", "env.image_size=[16,20]", "progress=false"]


class Lifter:
    """Moves the (fake) TCP up: succeeds under the final-step rule in the double."""
    name = "lifter"

    def __init__(self, fail_on=None):
        self.resets, self.fail_on, self.calls = [], fail_on, 0

    def reset(self, instruction=None):
        self.resets.append(instruction)

    def act(self, obs):
        assert obs["image"].shape == (16, 20, 3) and isinstance(obs["instruction"], str)
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("policy crashed")
        return np.array([0, 0, 0.03, 0, 0, 0, 0], np.float32)


def test_simpler_run_records_and_aggregation(tmp_path):
    pol = Lifter()
    s = evaluate(SIM + ["env.tasks=[google_robot_pick_coke_can,widowx_carrot_on_plate]", "episodes_per_task=4",
                        "max_episode_steps=3", "env.policy_name=octo-base", f"out_dir={tmp_path}"], policy=pol)
    assert s["episodes"] == 8 and s["mean_success"] == 1.0 and s["success_mode"] == "final_step"
    recs = load_records(str(tmp_path))
    coke = [r for r in recs if r["task"] == "google_robot_pick_coke_can"]
    # 4 of the 300 grid episodes, spread over it: several URDF variants and orientations
    assert len({r["variant"] for r in coke}) >= 3 and len({r["subtask"] for r in coke}) >= 2
    assert all(r["steps"] == 3 and r["success_mode"] == "final_step" for r in recs)
    sim = s["simpler"]
    assert sim["official"]["google_robot_pick_coke_can"]["success"] == 1.0
    assert set(sim["official"]["google_robot_pick_coke_can"]["variants"]) == {r["variant"] for r in coke}
    assert sim["pooled"]["widowx_carrot_on_plate"]["episodes"] == 4
    # Octo-Base at 100% in sim (29% real) breaks the ranking: MMRV rises far above the published 0.031.
    vr = sim["vs_real"]
    assert vr["rows"]["google_robot_pick_coke_can"]["mmrv"] > 0.3 and vr["policy"] == "octo-base"
    assert vr["setting"] == "visual_matching" and "SIMPLER_PERF" in vr["table"]
    assert sim["episode_seed"] == "official" and all(r["episode_seed"] == "official" for r in recs)
    md = (tmp_path / "summary.md").read_text()
    assert "official %" in md and "google_robot_pick_coke_can" in md and "SIMPLER_PERF (visual matching)" in md
    assert "episode randomness: official" in md
    assert pol.resets[0] == "pick coke can"


def test_resume_skips_finished_episodes_and_survives_a_torn_line(tmp_path):
    args = SIM + ["env.task=google_robot_move_near", "max_episode_steps=2", "policy=random", "workers=0",
                  f"out_dir={tmp_path}", "videos_per_task=0"]
    first = evaluate(args + ["episodes_per_task=3"])
    assert first["throughput"]["episodes_run"] == 3
    with open(rank_file(str(tmp_path), 0), "a") as f:
        f.write('{"key": "torn')  # a run killed mid-write
    second = evaluate(args + ["episodes_per_task=5"])
    assert second["throughput"]["episodes_run"] == 2 and second["episodes"] == 5 and second["complete"]
    keys = [json.loads(line)["key"] for line in open(rank_file(str(tmp_path), 0))]
    assert len(keys) == len(set(keys)) == 5
    assert evaluate(args + ["episodes_per_task=5"])["throughput"]["episodes_run"] == 0
    with pytest.raises(ValueError, match="different run"):
        evaluate(SIM + ["env.task=google_robot_move_near", "policy=random", "seed=7", f"out_dir={tmp_path}"])


def test_failed_episode_is_retried_on_resume(tmp_path):
    args = SIM + ["env.task=widowx_stack_cube", "episodes_per_task=3", "max_episode_steps=2", f"out_dir={tmp_path}"]
    s = evaluate(args, policy=Lifter(fail_on=3))  # the 2nd episode's first step crashes
    assert s["episodes"] == 2 and not s["complete"] and s["throughput"]["errors"] == 1
    assert (tmp_path / "errors.rank000.jsonl").exists()
    s = evaluate(args, policy=Lifter())
    assert s["throughput"]["episodes_run"] == 1 and s["complete"]


def test_ranks_shard_and_rank0_merges(tmp_path, monkeypatch):
    args = SIM + ["env.task=google_robot_pick_coke_can", "episodes_per_task=5", "max_episode_steps=2",
                  "policy=random", "workers=0", f"out_dir={tmp_path}", "merge_wait_s=30"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r1 = evaluate(args)
    assert r1["throughput"]["episodes_run"] == 2 and "files" not in r1
    monkeypatch.setenv("RANK", "0")
    r0 = evaluate(args)
    assert r0["throughput"]["episodes_run"] == 3 and r0["episodes"] == 5 and r0["complete"]
    assert os.path.exists(rank_file(str(tmp_path), 1)) and (tmp_path / "summary.json").exists()


def test_spawned_workers_and_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([DOUBLE, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "selfflow_robot.evaluate", *SIM, "env.task=widowx_spoon_on_towel",
           "episodes_per_task=4", "max_episode_steps=3", "policy=random", "workers=2", "videos_per_task=1",
           "video_format=gif", f"out_dir={tmp_path}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["episodes"] == 4 and s["throughput"]["workers"] == 2
    assert len(list((tmp_path / "videos" / "widowx_spoon_on_towel").glob("*.gif"))) == 1


def test_policy_served_over_websocket(tmp_path):
    pytest.importorskip("websockets")
    from selfflow_robot.policies.server import PolicyServer

    class ChunkPolicy:
        metadata = {"action_dim": 7, "chunk": 2}

        def reset(self, instruction=None):
            pass

        def infer(self, obs):
            return {"actions": np.tile(np.array([0, 0, 0.03, 0, 0, 0, 0], np.float32), (2, 1))}

    server = PolicyServer(ChunkPolicy(), host="127.0.0.1", port=0)
    port = server.start_in_thread()
    try:
        s = evaluate(SIM + ["env.task=google_robot_pick_coke_can", "episodes_per_task=2", "max_episode_steps=3",
                            f"policy=ws://127.0.0.1:{port}", "workers=0", f"out_dir={tmp_path}"])
    finally:
        server.stop()
    assert s["episodes"] == 2 and s["mean_success"] == 1.0


def test_torchrun_two_ranks_merge(tmp_path):
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([DOUBLE, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "selfflow_robot.evaluate", *SIM, "env.task=google_robot_pick_coke_can", "episodes_per_task=5",
           "max_episode_steps=2", "policy=random", "workers=0", f"out_dir={tmp_path}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["episodes"] == 5 and s["complete"] and s["throughput"]["world_size"] == 2
    per_rank = [sum(1 for _ in open(rank_file(str(tmp_path), r))) for r in (0, 1)]
    assert per_rank == [3, 2]


def test_fails_fast_without_simpler_or_with_a_wrong_policy(tmp_path):
    import importlib.util
    with pytest.raises(ValueError, match="only available for env=metaworld"):
        evaluate(SIM + ["policy=expert", f"out_dir={tmp_path}"])
    if importlib.util.find_spec("mani_skill2_real2sim") is None:
        with pytest.raises(ImportError, match="pip install"):
            evaluate(["env=simpler", "policy=random", "progress=false", f"out_dir={tmp_path}"])


def test_chart_titles_shorten_checkpoint_paths():
    from selfflow_robot.evaluation.plots import short_policy_name

    assert short_policy_name("/tmp/x/outputs/quickstart/run/finetune/checkpoints/step_00002000") == \
        "…/finetune/checkpoints/step_00002000"
    assert [short_policy_name(p) for p in ("expert", "ws://gpu:8000", "runs/ft")] == ["expert", "ws://gpu:8000",
                                                                                      "runs/ft"]


def test_results_are_tied_to_the_resolved_checkpoint(tmp_path, monkeypatch):
    """`run`, `run/` and an absolute path name one checkpoint; more training names another (so one
    out_dir never mixes two); a mistyped path fails before anything is written."""
    from selfflow_robot.evaluation.policy_factory import policy_identity

    run_dir = tmp_path / "run"
    for step in ("step_00000008", "step_00000012"):
        (run_dir / "checkpoints" / step).mkdir(parents=True)
        (run_dir / "checkpoints" / step / "model.safetensors").write_bytes(b"")
    latest = run_dir / "checkpoints" / "latest"
    latest.write_text("step_00000008")
    monkeypatch.chdir(tmp_path)
    first = policy_identity("run")
    assert first == policy_identity("run/") == policy_identity(str(run_dir)) and first.endswith("step_00000008")
    latest.write_text("step_00000012")
    assert policy_identity("run") != first
    assert policy_identity("expert") == "expert" and policy_identity("ws://host:8000") == "ws://host:8000"
    out = tmp_path / "eval"
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate(SIM + ["env.task=google_robot_move_near", f"policy={tmp_path / 'nope'}", f"out_dir={out}",
                        "workers=2"])
    assert not out.exists()


def test_a_worker_that_cannot_load_the_policy_reports_it_in_one_line(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model": {"name": "tiny", "action_dim": 7}, "io": {}}))
    (ckpt / "model.safetensors").write_bytes(b"")
    # Many queued episodes: the parent must also exit although no worker drained the job queue.
    script = (f"import sys; sys.path.insert(0, {DOUBLE!r}); from selfflow_robot.evaluate import evaluate\n"
              f"evaluate({SIM!r} + ['env.task=google_robot_move_near', 'episodes_per_task=2000', "
              f"'policy={ckpt}', 'out_dir={tmp_path / 'eval'}', 'workers=2'])")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "ValueError: an evaluation worker could not start: ") and "normalization.json" in proc.stderr


def _fake_checkpoint(path, run_cfg: dict) -> str:
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"")
    (path / "config.json").write_text(json.dumps(run_cfg))
    return str(path)


def test_simpler_action_mode_follows_the_training_data(tmp_path, caplog):
    """dataset=rt1 makes the gripper absolute (1 = open) and keeps roll-pitch-yaw deltas: SIMPLER must
    convert with eef_rpy_absgrip (the default `env` mode read +1 as 'close', inverting the gripper)."""
    import logging

    from selfflow_robot.evaluation.training_env import match_training_env
    from selfflow_robot.policies.policy import metadata_from_config

    rt1 = {"model": {"name": "tiny"}, "dataset": {"source": "rlds", "rlds": {"gripper": "rel2abs"}},
           "io": {"action_dim": 7, "image_size": [64, 80]}}
    ckpt = _fake_checkpoint(tmp_path / "rt1", rt1)
    env = match_training_env({"env": {"name": "simpler", "action_mode": None}, "policy": ckpt})["env"]
    assert env["action_mode"] == "eef_rpy_absgrip" and env["image_size"] == [64, 80]  # rendered at the trained size
    assert match_training_env({"env": {"name": "simpler", "image_size": [256, 320]}, "policy": ckpt})["env"][
        "image_size"] == [256, 320]
    assert match_training_env({"env": {"name": "simpler", "action_mode": "rt1"}, "policy": ckpt})["env"][
        "action_mode"] == "rt1"  # explicit values win
    assert metadata_from_config(rt1)["training_env"] == {"simpler": {"action_mode": "eef_rpy_absgrip"}}
    other = _fake_checkpoint(tmp_path / "lerobot", {**rt1, "dataset": {"source": "lerobot"}})
    with caplog.at_level(logging.WARNING, logger="selfflow_robot"):
        env = match_training_env({"env": {"name": "simpler", "action_mode": None}, "policy": other})["env"]
    assert env["action_mode"] == "env" and "does not say which action convention" in caplog.text


def test_a_policy_for_another_env_is_refused_before_any_episode(tmp_path):
    from selfflow_robot.evaluation.training_env import match_training_env

    ckpt = _fake_checkpoint(tmp_path / "rt1", {"dataset": {"source": "rlds"}, "io": {"action_dim": 7}})
    with pytest.raises(ValueError, match="outputs 7-d actions but env=metaworld takes 4-d"):
        match_training_env({"env": {"name": "metaworld"}, "policy": ckpt})
    meta_ckpt = _fake_checkpoint(tmp_path / "mw", {"dataset": {"source": "metaworld"}, "io": {"action_dim": 4}})
    with pytest.raises(ValueError, match="outputs 4-d actions but env=simpler takes 7 or 8-d"):
        match_training_env({"env": {"name": "simpler", "action_mode": None}, "policy": meta_ckpt})


def test_the_command_exits_non_zero_when_episodes_fail(tmp_path):
    """Every episode raising used to end with exit code 0 and a NaN mean in summary.json."""
    pytest.importorskip("websockets")
    from selfflow_robot.cli import compose
    from selfflow_robot.evaluate import _main_exit_on_errors
    from selfflow_robot.policies.server import PolicyServer

    class Broken:
        metadata = {"action_dim": 7}

        def reset(self, instruction=None):
            pass

        def infer(self, obs):
            raise RuntimeError("the policy crashed")

    server = PolicyServer(Broken(), host="127.0.0.1", port=0)
    port = server.start_in_thread()
    try:
        cfg = compose("evaluate", SIM + ["env.task=google_robot_pick_coke_can", "episodes_per_task=2",
                                         "max_episode_steps=2", f"policy=ws://127.0.0.1:{port}", "workers=0",
                                         f"out_dir={tmp_path}"])
        with pytest.raises(SystemExit, match="2 episode\\(s\\) failed"):
            _main_exit_on_errors(cfg)
    finally:
        server.stop()
    summary = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: no NaN
    assert summary["episodes"] == 0 and summary["mean_success"] is None


def test_policy_kwargs_documented_overrides_compose():
    """`policy_kwargs: {}` was a struct: `policy_kwargs.sampler_steps=1` and the documented
    `policy_kwargs={sampler_steps: 5, execute_steps: 4}` were refused; nulls are not passed on."""
    from selfflow_robot.cli import check_overrides, compose, to_container
    from selfflow_robot.evaluation.policy_factory import policy_load_kwargs

    def kwargs(overrides):
        check_overrides("evaluate", overrides)  # the command line's own check (SystemExit on unknown keys)
        return policy_load_kwargs(to_container(compose("evaluate", overrides)))

    assert kwargs([]) == {}
    assert kwargs(["policy_kwargs.sampler_steps=1"]) == {"sampler_steps": 1}
    assert kwargs(["policy_kwargs={sampler_steps: 5, execute_steps: 4}"]) == {"sampler_steps": 5, "execute_steps": 4}
    assert kwargs(["+policy_kwargs.sampler_steps=5", "+policy_kwargs.ensemble=true"]) == {"sampler_steps": 5,
                                                                                          "ensemble": True}
    assert kwargs(["policy_kwargs.normalized_clip=off"]) == {"normalized_clip": None}
    with pytest.raises(SystemExit, match="did you mean policy_kwargs.sampler_steps"):
        check_overrides("evaluate", ["policy_kwargs.sampler_step=5"])


def test_resume_with_other_policy_kwargs_is_refused(tmp_path):
    """Sampler steps / chunking / safety change the actions: one out_dir must not mix them. A run.json
    written before policy_kwargs was recorded still resumes with the defaults."""
    ckpt = _fake_checkpoint(tmp_path / "ck", {"dataset": {"source": "rlds"}, "io": {"action_dim": 7}})
    out = tmp_path / "eval"
    args = SIM + ["env.task=google_robot_move_near", "episodes_per_task=1", f"policy={ckpt}", f"out_dir={out}",
                  "workers=0"]
    cannot_load = (FileNotFoundError, ValueError)  # the fake checkpoint has no weights: past the run.json check
    with pytest.raises(cannot_load, match="normalization"):
        evaluate(args + ["+policy_kwargs.sampler_steps=5"])
    run = json.loads((out / "run.json").read_text())
    assert run["policy_kwargs"] == {"sampler_steps": 5}
    with pytest.raises(ValueError, match="different run .*differs in: policy_kwargs"):
        evaluate(args + ["+policy_kwargs.sampler_steps=2"])
    with pytest.raises(ValueError, match="different run .*differs in: policy_kwargs"):
        evaluate(args)
    del run["policy_kwargs"]  # an older run.json
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(cannot_load, match="normalization"):
        evaluate(args)
    assert json.loads((out / "run.json").read_text())["policy_kwargs"] == {}


def test_bad_task_video_format_or_episode_count_fail_before_run_json(tmp_path):
    """Found only inside workers, after run.json was written, these made the corrected command a
    'different run'; episodes_per_task=0 silently ran 10 episodes, a negative count none."""
    out = tmp_path / "eval"
    base = SIM + ["policy=random", "workers=0", f"out_dir={out}", "max_episode_steps=1", "videos_per_task=0"]
    with pytest.raises(ValueError, match="unknown SIMPLER task 'google_robot_pick_coke_cam'; "
                                         "did you mean google_robot_pick_coke_can"):
        evaluate(base + ["env.tasks=[google_robot_pick_coke_cam]", "env.episode_plan=prepackaged",
                         "episodes_per_task=1"])
    with pytest.raises(ValueError, match="video_format=avi"):
        evaluate(base + ["env.task=google_robot_move_near", "video_format=avi", "episodes_per_task=1"])
    for n in (0, -2):
        for plan in ("official", "prepackaged"):
            with pytest.raises(ValueError, match=f"episodes_per_task={n}"):
                evaluate(base + ["env.task=google_robot_move_near", f"env.episode_plan={plan}",
                                 f"episodes_per_task={n}"])
    assert not out.exists()
    s = evaluate(base + ["env.task=google_robot_move_near", "env.episode_plan=prepackaged", "video_format=GIF"])
    assert s["episodes"] == 10  # null: the default


def test_simpler_variant_aggregation_uses_its_own_table_and_a_named_seed(tmp_path):
    s = evaluate(SIM + ["env.task=google_robot_pick_coke_can", "env.setting=variant_aggregation", "episodes_per_task=2",
                        "max_episode_steps=1", "env.policy_name=rt-1-x", "env.episode_seed=5", f"out_dir={tmp_path}"],
                 policy=Lifter())
    vr = s["simpler"]["vs_real"]
    assert vr["setting"] == "variant_aggregation" and "variant-aggregation" in vr["table"]
    assert s["simpler"]["episode_seed"] == 5 and {r["episode_seed"] for r in load_records(str(tmp_path))} == {5}
    md = (tmp_path / "summary.md").read_text()
    assert "env seed 5 (not the official one)" in md and "published variant-aggregation numbers" in md
    with pytest.raises(ValueError, match="env.episode_seed"):
        evaluate(SIM + ["env.episode_seed=abc", f"out_dir={tmp_path / 'bad'}"], policy=Lifter())
