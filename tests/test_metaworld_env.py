"""Meta-World adapter: spaces, seeding, rendering, experts, Gymnasium registration."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("metaworld")
pytestmark = pytest.mark.sim

from selfflow_robot.envs.metaworld import (MT10_TASKS, MT50_TASKS, TASK_INSTRUCTIONS, MetaWorldEnv,
                                           make_expert, register_envs)


def test_task_tables():
    import metaworld

    assert len(MT10_TASKS) == 10 and set(MT10_TASKS) <= set(MT50_TASKS)
    assert set(MT50_TASKS) == set(metaworld.ALL_V3_ENVIRONMENTS)
    assert all(isinstance(TASK_INSTRUCTIONS[t], str) and TASK_INSTRUCTIONS[t] for t in MT50_TASKS)
    assert len(set(TASK_INSTRUCTIONS.values())) == len(MT50_TASKS)


def test_unknown_task_names_choices():
    with pytest.raises(ValueError, match="reach-v3"):
        MetaWorldEnv(task="reach-v9")


def test_reset_step_spaces_and_seeding():
    env = MetaWorldEnv(task="reach-v3", image_size=(32, 40), max_episode_steps=3)
    obs, info = env.reset(seed=0)
    assert obs["image"].shape == (32, 40, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].std() > 0, "blank render"
    assert obs["instruction"] == TASK_INSTRUCTIONS["reach-v3"]
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (4,)
    assert env.observation_space.contains(obs)
    goal0 = env.raw_observation[-3:].copy()
    env.reset(seed=1)
    assert not np.allclose(goal0, env.raw_observation[-3:]), "seed does not change the goal"
    obs2, _ = env.reset(seed=0)
    np.testing.assert_array_equal(goal0, env.raw_observation[-3:])
    np.testing.assert_array_equal(obs["image"], obs2["image"])
    for t in range(3):
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        assert isinstance(info["success"], bool) and not term
    assert trunc, "max_episode_steps not enforced"
    env.close()


def test_expert_solves_reach_with_action_repeat():
    env = MetaWorldEnv(task="reach-v3", image_size=(16, 16), include_state=False, action_repeat=4)
    expert = make_expert("reach-v3")
    obs, _ = env.reset(seed=3)
    assert "state" not in obs
    for t in range(env.max_episode_steps):
        obs, r, term, trunc, info = env.step(expert(env))
        if info["success"]:
            break
    assert info["success"] and t < 40
    env.close()


def test_gym_registration():
    register_envs()
    register_envs()  # idempotent
    env = gym.make("selfflow/MetaWorld-v0", task="drawer-close-v3", image_size=(24, 24), state_mode="full")
    obs, _ = env.reset(seed=0)
    assert obs["state"].shape == (39,) and obs["image"].shape == (24, 24, 3)
    env.close()
    # Gymnasium's own max_episode_steps is the episode limit, also above the env's 500
    env = gym.make("selfflow/MetaWorld-v0", task="reach-v3", image_size=(8, 8), max_episode_steps=501)
    env.reset(seed=0)
    assert env.unwrapped.max_episode_steps == 501
    env.close()
