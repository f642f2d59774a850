"""SimplerGym against the SIMPLER test double, and against real SIMPLER where installed."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "simpler_double"))
from simpler_backends import BACKENDS, GOOGLE_TASK, REAL, WIDOWX_TASK  # noqa: E402

from selfflow_robot.envs.simpler import SimplerGym  # noqa: E402
from selfflow_robot.envs.simpler_plans import official_plan  # noqa: E402

INFO_KEYS = {"success", "elapsed_steps", "episode_stats", "instruction", "is_final_subtask", "episode_success",
             "success_mode", "task", "variant", "episode_id", "policy_terminated", "env_action"}


def make(task, backend="fake_simpler_env", **kw):
    return SimplerGym(task, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task,hw", [(GOOGLE_TASK, (512, 640)), (WIDOWX_TASK, (480, 640))])
def test_observation_layout_spaces_and_info(backend, task, hw):
    env = make(task, backend, episode_plan="official", include_state=True, max_episode_steps=3)
    obs, info = env.reset(options={"episode_idx": 0})
    assert obs["image"].shape == (*hw, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
    assert np.isclose(np.linalg.norm(obs["state"][3:7]), 1.0, atol=1e-5)  # unit quaternion
    assert obs["instruction"] == {GOOGLE_TASK: "pick coke can", WIDOWX_TASK: "put carrot on plate"}[task]
    assert env.observation_space.contains(obs)
    assert info["episode_id"] == official_plan(task)[0]["episode_id"] and info["episode_success"] is False
    obs, r, term, trunc, info = env.step(np.zeros(7, np.float32))
    assert INFO_KEYS <= set(info) and env.observation_space.contains(obs)
    assert info["instruction"] == obs["instruction"]
    assert env.render().shape == (*hw, 3)
    env.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_clip_and_truncation(backend):
    env = make(GOOGLE_TASK, backend, image_size=(64, 80), max_episode_steps=4)
    assert env.observation_space["image"].shape == (64, 80, 3)
    obs, _ = env.reset(seed=1)
    assert obs["image"].shape == (64, 80, 3)
    steps, truncated = 0, False
    while not truncated:
        obs, _, terminated, truncated, info = env.step([5, -5, 0, 3, 0, -3, 2])
        assert not terminated
        steps += 1
    assert steps == 4 and info["elapsed_steps"] == 4
    np.testing.assert_allclose(info["env_action"], [1, -1, 0, np.pi / 2, 0, -np.pi / 2, 1], atol=1e-6)
    env.close()


def test_plan_kwargs_are_copied_and_env_rebuilt_only_on_change():
    plan = official_plan(GOOGLE_TASK)
    pristine = copy.deepcopy(plan)
    env = make(GOOGLE_TASK, episode_plan=plan)
    env.reset(options={"episode_idx": 0})
    inner = env.unwrapped_sim
    kw = inner.make_kwargs
    assert kw["renderer_kwargs"] == {"offscreen_only": True} and kw["obs_mode"] == "rgbd"
    assert kw["rgb_overlay_path"].endswith("real_inpainting/google_coke_can_real_eval_1.png")
    assert kw["lr_switch"] is True and kw["camera_cfgs"] == {"add_segmentation": True}
    assert inner.reset_options["obj_init_options"] == {"init_xy": [-0.35, -0.02]}
    env.reset(options={"episode_idx": 1})
    assert env.unwrapped_sim is inner  # same build kwargs: no rebuild
    other = next(i for i, e in enumerate(plan) if e["variant"] != plan[0]["variant"])
    env.reset(options={"episode_idx": other})
    assert env.unwrapped_sim is not inner and env.unwrapped_sim.make_kwargs["urdf_version"] == plan[other]["variant"][5:]
    env.step(np.zeros(7))
    assert plan == pristine  # nothing in the plan was mutated
    env.reset()  # without episode_idx: the next entry
    assert env._episode["episode_id"] == plan[other + 1]["episode_id"]


def test_prepackaged_random_draw():
    env = make(WIDOWX_TASK)
    env.reset(seed=3)
    kw = env.unwrapped_sim.make_kwargs
    assert kw["prepackaged_config"] is True and kw["obs_mode"] == "rgbd"
    assert env.metadata["render_fps"] == 5
    with pytest.raises(ValueError, match="visual matching only"):
        make(GOOGLE_TASK, setting="variant_aggregation")


def _updown(env, up=3, down=3):
    results = []
    for a in [0.03] * up + [-0.03] * down:
        _, _, term, trunc, info = env.step([0, 0, a, 0, 0, 0, 0])
        results.append((term, trunc, info["episode_success"], info["success"]))
        if term or trunc:
            break
    return results


def test_success_modes():
    final = _updown(_reset(make(GOOGLE_TASK, success_mode="final_step", max_episode_steps=6)))
    assert [r[3] for r in final] == [False, True, True, True, False, False]  # env flag per step
    assert final[-1][:3] == (False, True, False)  # official: the flag at the last step
    anyst = _updown(_reset(make(GOOGLE_TASK, success_mode="any_step", max_episode_steps=6)))
    assert len(anyst) == 6 and anyst[-1][:3] == (False, True, True)
    early = _updown(_reset(make(GOOGLE_TASK, success_mode="early_stop", max_episode_steps=6)))
    assert len(early) == 2 and early[-1][:3] == (True, False, True)


def _reset(env):
    env.reset(seed=0)
    return env


def test_apple_subtasks_follow_the_official_loop():
    env = make("google_robot_place_apple_in_closed_top_drawer", episode_plan="official")
    obs, info = env.reset(options={"episode_idx": 0})
    assert obs["instruction"] == "open top drawer" and info["is_final_subtask"] is False
    obs, _, term, _, info = env.step([0, 0, 0, 0, 0, 0, 0, 1.0])  # policy says "done" -> advance
    assert not term and obs["instruction"] == "place apple into top drawer" and info["is_final_subtask"]
    env.request_terminate()
    _, _, term, _, info = env.step(np.zeros(7))
    assert term and info["policy_terminated"]
    # Without a terminate signal the env itself advances on the step after the 100th: it checks the
    # elapsed steps before stepping.
    obs, _ = env.reset(options={"episode_idx": 1})
    for t in range(100):
        obs, *_ = env.step(np.zeros(7))
    assert obs["instruction"] == "open top drawer"
    obs, *_ = env.step(np.zeros(7))
    assert obs["instruction"] == "place apple into top drawer"


def test_terminate_when_the_8th_element_is_positive():
    env = _reset(make(GOOGLE_TASK))
    _, _, term, _, info = env.step([0, 0, 0, 0, 0, 0, 0, 0.0])
    assert not term and not info["policy_terminated"]
    _, _, term, _, info = env.step([0, 0, 0, 0, 0, 0, 0, 0.2])  # the evaluator's `terminate_episode[0] > 0`
    assert term and info["policy_terminated"]


def test_sticky_gripper_reads_the_raw_unclipped_value():
    """Octo's wrapper differences raw model outputs: 1.3 -> 0.9 is a relative 0.4 (clipped to [0, 1]
    it would be 0.1); 0.2 -> -0.4 is 0.6 and starts the 15-step sticky close (clipped: 0.2, no)."""
    env = _reset(make(GOOGLE_TASK, action_mode="eef_rpy_absgrip"))
    grips = [env.step([0, 0, 0, 0, 0, 0, g])[4]["env_action"][6] for g in (1.3, 0.9)]
    assert np.allclose(grips, [0.0, 0.4])
    env.reset(seed=0)
    grips = [env.step([0, 0, 0, 0, 0, 0, g])[4]["env_action"][6] for g in (0.2, -0.4, -0.4, -0.4)]
    assert np.allclose(grips, [0.0, 0.6, 0.6, 0.6])


def test_official_episode_seed_and_explicit_seed():
    """reset(seed=None) on a plan episode draws what a fresh env's unseeded reset draws (main RNG 2022)."""
    from selfflow_robot.envs.simpler import OFFICIAL_EPISODE_SEED

    plan = official_plan(GOOGLE_TASK, "variant_aggregation", "distractors")
    env = make(GOOGLE_TASK, setting="variant_aggregation", episode_plan=plan)
    _, info = env.reset(options={"episode_idx": 3})
    assert info["episode_seed"] == "official" and env.unwrapped_sim.episode_seed == OFFICIAL_EPISODE_SEED
    placed = env.unwrapped_sim.distractor_xy
    env.reset(options={"episode_idx": 4})
    env.reset(options={"episode_idx": 3})  # same episode again, after others: same placement
    assert env.unwrapped_sim.distractor_xy == placed
    fresh = env.unwrapped_sim.__class__(**{k: v for k, v in env.unwrapped_sim.make_kwargs.items() if v is not None})
    fresh.reset(options=plan[3]["options"])  # the official evaluator: a fresh env, no seed
    assert fresh.distractor_xy == placed
    _, info = env.reset(seed=7, options={"episode_idx": 3})
    assert info["episode_seed"] == 7 and env.unwrapped_sim.distractor_xy != placed


def test_double_knows_every_planned_env_and_only_the_real_kwargs():
    import gymnasium as gym

    from selfflow_robot.envs.simpler_tasks import TASKS
    import fake_simpler_env  # noqa: F401

    for t in TASKS.values():
        assert f"FakeSimpler/{t.env_id}" in gym.envs.registry, t.env_id
    with pytest.raises(TypeError, match="distractor_config"):  # only the distractor env takes it
        gym.make("FakeSimpler/GraspSingleOpenedCokeCanInScene-v0", obs_mode="rgbd", distractor_config="more",
                 control_mode=fake_simpler_env.envs.GOOGLE_CONTROL)


def test_eef_rpy_absgrip_google_sticky_gripper_and_rotation():
    env = _reset(make(GOOGLE_TASK, action_mode="eef_rpy_absgrip"))
    grips = []
    for t in range(20):
        open_cmd = 1.0 if t < 2 else 0.0
        _, _, _, _, info = env.step([0, 0, 0, 0.1, 0.2, 0.3, open_cmd])
        grips.append(info["env_action"][6])
    assert grips[:2] == [0.0, 0.0] and grips[2:17] == [1.0] * 15 and grips[17:] == [0.0] * 3
    cr, sr, cp, sp, cy, sy = np.cos(0.1), np.sin(0.1), np.cos(0.2), np.sin(0.2), np.cos(0.3), np.sin(0.3)
    rot = (np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]]) @ np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
           @ np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]]))
    angle = np.arccos((np.trace(rot) - 1) / 2)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]]) / (2 * np.sin(angle))
    np.testing.assert_allclose(info["env_action"][3:6], axis * angle, atol=1e-6)
    assert env.unwrapped_sim.agent.get_gripper_closedness() == 1.0  # +1 relative closes on Google
    env.reset(seed=0)  # sticky state is per episode
    _, _, _, _, info = env.step([0, 0, 0, 0, 0, 0, 0.0])
    assert info["env_action"][6] == 0.0


def test_widowx_gripper_conventions():
    env = _reset(make(WIDOWX_TASK, action_mode="eef_rpy_absgrip"))
    _, _, _, _, info = env.step([0, 0, 0, 0, 0, 0, 0.2])
    assert info["env_action"][6] == -1.0 and env.unwrapped_sim.agent.get_gripper_closedness() == 1.0
    _, _, _, _, info = env.step([0, 0, 0, 0, 0, 0, 0.8])
    assert info["env_action"][6] == 1.0
    rt1 = _reset(make(WIDOWX_TASK, action_mode="rt1"))
    _, _, _, _, info = rt1.step([1.75, 0, -1.75, 0, 0, 1.4, 1.0])  # RT-1 +1 = close
    np.testing.assert_allclose(info["env_action"], [0.05, 0, -0.05, 0, 0, 0.25, -1.0], atol=1e-6)
    g = _reset(make(GOOGLE_TASK, action_mode="rt1"))
    _, _, _, _, info = g.step([0.01, 0, 0, 0.1, 0, 0, 0.005])
    np.testing.assert_allclose(info["env_action"], [0.01, 0, 0, 0.1, 0, 0, 0.0], atol=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown SIMPLER task"):
        SimplerGym("google_robot_fly")
    with pytest.raises(ValueError, match="action_mode"):
        SimplerGym(GOOGLE_TASK, action_mode="joint")
    with pytest.raises(ValueError, match="variant"):
        SimplerGym(GOOGLE_TASK, episode_plan="official", variant="urdf_nope")
    env = _reset(make(GOOGLE_TASK))
    with pytest.raises(ValueError, match="7-D"):
        env.step(np.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        env.step([np.nan] * 7)


def test_missing_simpler_says_how_to_install():
    import importlib.util
    if importlib.util.find_spec(REAL) is not None:
        pytest.skip("SIMPLER is installed here")
    with pytest.raises(ImportError, match="git clone https://github.com/simpler-env/SimplerEnv"):
        SimplerGym(GOOGLE_TASK)


def test_integer_downscale_averages_blocks():
    from selfflow_robot.envs.simpler import _resize
    img = np.zeros((4, 6, 3), np.uint8)
    img[0, 0] = 200  # one bright pixel in the top-left 2x2 block
    out = _resize(img, (2, 3))
    assert out.shape == (2, 3, 3) and out[0, 0, 0] == 50 and out[1, 2, 0] == 0
    assert _resize(img, (3, 5)).shape == (3, 5, 3)


def test_gymnasium_max_episode_steps_is_the_episode_limit():
    """gym.make(..., max_episode_steps=N) ended episodes at the task's 60/80 before: its TimeLimit
    can only cut shorter than the adapter's own limit."""
    import gymnasium as gym

    import selfflow_robot.envs  # noqa: F401  registers selfflow/Simpler-v0

    env = gym.make("selfflow/Simpler-v0", task=WIDOWX_TASK, backend="fake_simpler_env", max_episode_steps=65)
    _, info = env.reset(seed=0)
    assert (info["max_episode_steps"], info["max_episode_steps_from"]) == (65, "gym.make")
    steps, done = 0, False
    while not done:
        _, _, term, trunc, _ = env.step(np.zeros(7, np.float32))
        steps, done = steps + 1, term or trunc
    assert steps == 65  # not the task's 60
    env.close()
    _, info = make(WIDOWX_TASK).reset(seed=0)
    assert (info["max_episode_steps"], info["max_episode_steps_from"]) == (60, "task")
