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


def register_all() -> None:
    """Register both ids (idempotent)."""
    for env_id, entry in _ENTRY_POINTS.items():
        if env_id not in gym.envs.registry:
            gym.register(id=env_id, entry_point=entry)


register_all()
