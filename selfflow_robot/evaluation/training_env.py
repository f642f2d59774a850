"""Evaluate a checkpoint in the env it was trained for.

A Meta-World policy is trained on demonstrations rendered from one camera, at one image size and
one action repeat (simulator steps per policy step). Env settings left null in the `env` config
are filled from the checkpoint's dataset config (or the settings recorded from the Meta-World
store it trained on), so `evaluate env=metaworld policy=RUN` rolls out
exactly as the data was collected; explicit values always win.

A SIMPLER policy's actions are in its training data's convention: RT-1 / OXE data standardised
with an absolute gripper (rel2abs, 1 = open) and roll-pitch-yaw deltas is what Octo and OpenVLA
output, SIMPLER's `eef_rpy_absgrip` action mode. A null `env.action_mode` is taken from the policy,
and a null `env.image_size` is the policy's trained frame size (rendered frames are resized once,
here, instead of travelling to a server at 512x640).
Served policies send both in their metadata (`training_env`), so ws:// evaluation does the same.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("selfflow_robot")

# env keys filled from the dataset config (same names there), else these defaults
_METAWORLD_DEFAULTS = {"tasks": "mt10", "camera": "corner", "action_repeat": 1, "image_size": [128, 128],
                       "state_mode": "proprio"}
# action sizes each env takes (SIMPLER: 7, or 7 + a terminate flag)
ENV_ACTION_DIMS = {"metaworld": (4,), "simpler": (7, 8)}


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
    """The Meta-World env settings a run trained with (None: not a Meta-World run)."""
    data = trained.get("dataset") or {}
    if data.get("source") != "metaworld" and not (trained.get("data") or {}).get("metaworld"):
        return None
    env = {key: _trained_setting(trained, key, default) for key, default in _METAWORLD_DEFAULTS.items()}
    env["include_state"] = bool((trained.get("io") or {}).get("state_dim"))
    return env


def simpler_action_mode(trained: dict) -> str | None:
    """SIMPLER action mode matching the run's action convention (None: unknown). RLDS data whose
    gripper was made absolute (rel2abs, or invert of a 1 = closed one) holds Δxyz, Δroll-pitch-yaw
    and a 0..1 open gripper: Octo / OpenVLA's convention."""
    data = trained.get("dataset") or {}
    if data.get("source") == "rlds" and (data.get("rlds") or {}).get("gripper") in ("rel2abs", "invert"):
        return "eef_rpy_absgrip"
    return None


def training_env(trained: dict) -> dict:
    """What a served policy sends as metadata["training_env"]: {"metaworld": {...}} and/or
    {"simpler": {"action_mode": ...}}, as far as the run's config says."""
    out = {}
    metaworld = metaworld_training_env(trained)
    if metaworld:
        out["metaworld"] = metaworld
    mode = simpler_action_mode(trained)
    if mode:
        out["simpler"] = {"action_mode": mode}
    return out


def _served_metadata(cfg: dict) -> dict:
    """A policy server's metadata (one short connection)."""
    from selfflow_robot.policies.client import WebsocketClientPolicy

    with WebsocketClientPolicy(cfg["policy"], api_key=cfg.get("api_key"),
                               wait_for_server=float(cfg.get("wait_for_server") or 0)) as client:
        return dict(client.metadata)


def _policy_facts(cfg: dict) -> dict:
    """action_dim, state_dim, image_size (trained), views and training_env of a checkpoint or served
    policy; empty when it does not say (expert, random, an object)."""
    policy = cfg.get("policy")
    if isinstance(policy, str) and policy.startswith(("ws://", "wss://")):
        meta = _served_metadata(cfg)
    else:
        trained = _checkpoint_config(policy)
        if trained is None:
            return {}
        meta = {**(trained.get("io") or {}), "training_env": training_env(trained)}
    return {k: meta.get(k) for k in ("action_dim", "state_dim", "image_size", "views", "training_env")}


def _check_action_dim(env_name: str, action_dim, policy) -> None:
    dims = ENV_ACTION_DIMS.get(env_name)
    if action_dim and dims and int(action_dim) not in dims:
        raise ValueError(f"policy {policy} outputs {action_dim}-d actions but env={env_name} takes "
                         f"{' or '.join(map(str, dims))}-d ones: it was trained for another robot or env")


def _fill_metaworld(env: dict, facts: dict, served: bool, policy) -> None:
    unset = [k for k in (*_METAWORLD_DEFAULTS, "include_state") if env.get(k) is None]
    known = (facts.get("training_env") or {}).get("metaworld") or {}
    if served and unset and not known:
        log.warning("%s does not say which Meta-World settings it was trained with (not a selfflow-robot "
                    "server, or an older one): %s use the defaults %s; set them (e.g. env.action_repeat=4) "
                    "to match the policy's training data", policy, ", ".join(unset),
                    {k: _METAWORLD_DEFAULTS.get(k, True) for k in unset})
    for key, default in _METAWORLD_DEFAULTS.items():
        if env.get(key) is None:
            env[key] = known.get(key, default)
    if env.get("include_state") is None:  # send state only to policies that condition on it
        said = known.get("include_state", facts.get("state_dim"))
        env["include_state"] = True if said is None else bool(said)


def _fill_simpler(env: dict, facts: dict, policy, said: bool) -> None:
    if env.get("image_size") is None and facts.get("image_size") and len(facts.get("views") or []) < 2:
        # rendered frames are resized to what the policy trained on here, not sent at 512x640
        env["image_size"] = [int(x) for x in facts["image_size"]]
    if env.get("action_mode") is not None:
        return
    mode = ((facts.get("training_env") or {}).get("simpler") or {}).get("action_mode")
    if mode is None and said:
        log.warning("%s does not say which action convention it was trained in: env.action_mode=env "
                    "(Δxyz, axis-angle, the robot's own gripper); set env.action_mode=eef_rpy_absgrip for "
                    "Octo/OpenVLA-style actions (absolute 0..1 gripper) or rt1 for raw RT-1 actions", policy)
    env["action_mode"] = mode or "env"


def match_training_env(cfg: dict) -> dict:
    """Fill the env's unset keys from what the policy was trained with, and refuse a policy whose
    action size the env cannot take."""
    env = cfg["env"]
    policy = cfg.get("policy")
    facts = _policy_facts(cfg)
    _check_action_dim(env.get("name"), facts.get("action_dim"), policy)
    if env.get("name") == "metaworld":
        _fill_metaworld(env, facts, isinstance(policy, str) and policy.startswith(("ws://", "wss://")), policy)
    elif env.get("name") == "simpler":
        _fill_simpler(env, facts, policy, said=bool(facts))
    return cfg
