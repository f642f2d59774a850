"""Gymnasium environments: SIMPLER adapter and Meta-World (imported as selfflow_robot.envs).

Importing this package registers `selfflow/Simpler-v0` (SimplerGym kwargs) and
`selfflow/MetaWorld-v0` (MetaWorldEnv kwargs) by entry-point string only, so it needs neither
torch, SIMPLER nor Meta-World; the adapters import their simulators when an env is built.
"""
from __future__ import annotations

import gymnasium as gym

SIMPLER_ID = "selfflow/Simpler-v0"
METAWORLD_ID = "selfflow/MetaWorld-v0"
_ENTRY_POINTS = {
    SIMPLER_ID: "selfflow_robot.envs.simpler:SimplerGym",
    METAWORLD_ID: "selfflow_robot.envs.metaworld:MetaWorldEnv",
}


class EpisodeLimitFromMake(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """gym.make(ID, max_episode_steps=N) adds a TimeLimit outside the env, which can only end
    episodes earlier than the env's own limit (SIMPLER's 60/80 steps, Meta-World's 500). This
    wrapper, applied by gym.make after the TimeLimit, hands N to the env so N is the limit."""

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        super().__init__(env)
        inner = env
        while isinstance(inner, gym.Wrapper):
            if isinstance(inner, gym.wrappers.TimeLimit):
                env.unwrapped.gym_max_episode_steps = int(inner._max_episode_steps)
                break
            inner = inner.env


_LIMIT_WRAPPER = gym.envs.registration.WrapperSpec(
    "EpisodeLimitFromMake", "selfflow_robot.envs:EpisodeLimitFromMake", {})


def register_all() -> None:
    """Register both ids (idempotent)."""
    for env_id, entry in _ENTRY_POINTS.items():
        if env_id not in gym.envs.registry:
            gym.register(id=env_id, entry_point=entry, additional_wrappers=(_LIMIT_WRAPPER,))


register_all()
