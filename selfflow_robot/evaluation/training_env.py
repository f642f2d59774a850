"""Evaluate a checkpoint in the env it was trained for.

A Meta-World policy is trained on demonstrations rendered from one camera, at one image size and
one action repeat (simulator steps per policy step). Env settings left null in the `env` config
are filled from the checkpoint's dataset config (or the settings recorded from the Meta-World
store it trained on), so `evaluate env=metaworld policy=RUN` rolls out
exactly as the data was collected; explicit values always win.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("selfflow_robot")

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


def metaworld_training_env(trained: dict) -> dict | None:
    """The Meta-World env settings a run trained with (None: not a Meta-World run). Served policies
    send them in their metadata, so evaluating one over ws:// rolls out the same way."""
    data = trained.get("dataset") or {}
    if data.get("source") != "metaworld" and not (trained.get("data") or {}).get("metaworld"):
        return None
    env = {key: _trained_setting(trained, key, default) for key, default in _METAWORLD_DEFAULTS.items()}
    env["include_state"] = bool((trained.get("io") or {}).get("state_dim"))
    return env


def _served_training_env(cfg: dict) -> dict | None:
    """metadata["training_env"]["metaworld"] of a policy server (one short connection)."""
    from selfflow_robot.policies.client import WebsocketClientPolicy

    with WebsocketClientPolicy(cfg["policy"], api_key=cfg.get("api_key"),
                               wait_for_server=float(cfg.get("wait_for_server") or 0)) as client:
        return (client.metadata.get("training_env") or {}).get("metaworld")


def match_training_env(cfg: dict) -> dict:
    env = cfg["env"]
    if env.get("name") != "metaworld":
        return cfg
    policy = cfg.get("policy")
    unset = [k for k in (*_METAWORLD_DEFAULTS, "include_state") if env.get(k) is None]
    if isinstance(policy, str) and policy.startswith(("ws://", "wss://")):
        served = _served_training_env(cfg) if unset else None
        if served:
            for key in unset:
                env[key] = served.get(key)
        elif unset:
            log.warning("%s does not say which Meta-World settings it was trained with (not a selfflow-robot "
                        "server, or an older one): %s use the defaults %s; set them (e.g. env.action_repeat=4) "
                        "to match the policy's training data", policy, ", ".join(unset),
                        {k: _METAWORLD_DEFAULTS.get(k, True) for k in unset})
    trained = _checkpoint_config(policy)
    for key, default in _METAWORLD_DEFAULTS.items():
        if env.get(key) is None:
            env[key] = _trained_setting(trained, key, default)
    if env.get("include_state") is None:  # send state only to policies that condition on it
        env["include_state"] = bool((trained.get("io") or {}).get("state_dim")) if trained else True
    return cfg
