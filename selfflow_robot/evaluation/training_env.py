"""Evaluate a checkpoint in the env it was trained for.

A Meta-World policy is trained on demonstrations rendered from one camera, at one image size and
one action repeat (simulator steps per policy step). Env settings left null in the `env` config
are filled from the checkpoint's dataset config (or the settings recorded from the Meta-World
store it trained on), so `evaluate env=metaworld policy=RUN` rolls out
exactly as the data was collected; explicit values always win.
"""
from __future__ import annotations

import os

# env keys filled from the dataset config (same names there), else these defaults
_METAWORLD_DEFAULTS = {"tasks": "mt10", "camera": "corner", "action_repeat": 1, "image_size": [128, 128],
                       "state_mode": "proprio"}


def _checkpoint_config(policy) -> dict | None:
    if not isinstance(policy, str) or "://" in policy or policy in ("expert", "random") or not os.path.exists(policy):
        return None
    from selfflow_robot.train.checkpoint import read_checkpoint_config

    try:
        return read_checkpoint_config(policy)
    except (FileNotFoundError, ValueError):
        return None  # Policy.load reports the problem with the path


def _trained_setting(trained: dict | None, key: str, default):
    """From the dataset config (dataset=metaworld), else the Meta-World store the run trained on
    (dataset=store of a `collect` output: its settings are recorded in the checkpoint's data)."""
    trained = trained or {}
    data = trained.get("dataset") or {}
    if data.get("source") == "metaworld" and data.get(key) is not None:
        return data[key]
    recorded = (trained.get("data") or {}).get("metaworld") or {}
    return recorded[key] if recorded.get(key) is not None else default


def match_training_env(cfg: dict) -> dict:
    env = cfg["env"]
    if env.get("name") != "metaworld":
        return cfg
    trained = _checkpoint_config(cfg.get("policy"))
    for key, default in _METAWORLD_DEFAULTS.items():
        if env.get(key) is None:
            env[key] = _trained_setting(trained, key, default)
    if env.get("include_state") is None:  # send state only to policies that condition on it
        env["include_state"] = bool((trained.get("io") or {}).get("state_dim")) if trained else True
    return cfg
