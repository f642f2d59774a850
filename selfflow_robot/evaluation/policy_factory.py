"""Resolve `policy=` into an object with reset(instruction) and act(obs) -> action.

`expert` (Meta-World scripted experts), `random` (uniform over the env's action space),
`ws://HOST:PORT` (the torch-free websocket client) or a checkpoint / run directory (Policy.load).
Policies that need the env (expert, random) expose bind(env, seed); the rollout calls it per episode.
"""
from __future__ import annotations

import numpy as np


class ExpertPolicy:
    """Meta-World's scripted policy for whatever task the bound env runs."""

    def __init__(self):
        self._experts: dict = {}
        self._env = None

    def bind(self, env, seed: int | None = None) -> None:
        from selfflow_robot.envs.metaworld import make_expert

        task = env.unwrapped.task
        if task not in self._experts:
            self._experts[task] = make_expert(task)
        self._env, self._expert = env, self._experts[task]

    def reset(self, instruction=None) -> None:
        pass

    def act(self, obs) -> np.ndarray:
        return self._expert(self._env)


class RandomPolicy:
    """Uniform random actions (a chance-level baseline); seeded per episode for reproducibility."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._rng = np.random.default_rng(seed)
        self._space = None

    def bind(self, env, seed: int | None = None) -> None:
        self._space = env.action_space
        if seed is not None:
            self._rng = np.random.default_rng([self.seed, int(seed)])

    def reset(self, instruction=None) -> None:
        pass

    def act(self, obs) -> np.ndarray:
        low, high = self._space.low, self._space.high
        return self._rng.uniform(low, high).astype(np.float32)


def _is_checkpoint(spec) -> bool:
    return isinstance(spec, str) and spec not in ("expert", "random") and not spec.startswith(("ws://", "wss://"))


def check_policy_env(spec, cfg: dict) -> None:
    if spec == "expert" and cfg["env"]["name"] != "metaworld":
        raise ValueError("policy=expert is only available for env=metaworld (Meta-World's scripted experts)")


def policy_load_kwargs(cfg: dict) -> dict:
    """The `policy_kwargs` passed on to Policy.load: configs/evaluate.yaml declares the supported
    keys with null defaults (so `policy_kwargs.sampler_steps=5` is a plain override); null means
    Policy.load's own default and is dropped. `normalized_clip=off` turns the normalised clip off
    (Policy.load's None, which a null cannot say)."""
    out = {}
    for key, value in dict(cfg.get("policy_kwargs") or {}).items():
        if value is None:
            continue
        if key == "normalized_clip" and isinstance(value, str) and value.lower() in ("off", "none"):
            value = None
        out[key] = value
    return out


def uses_policy_kwargs(spec) -> bool:
    """Only a checkpoint (Policy.load) reads policy_kwargs; expert, random and ws:// ignore them."""
    return _is_checkpoint(spec)


def policy_identity(spec) -> str:
    """What a results directory is tied to: the resolved checkpoint directory for a local policy
    (the same for `run`, `run/` or an absolute path; another after more training), else the spec."""
    if not _is_checkpoint(spec):
        return str(spec)
    from selfflow_robot.train.checkpoint import resolve_checkpoint

    return str(resolve_checkpoint(spec).resolve())


def make_policy(spec: str, cfg: dict):
    spec = str(spec)
    check_policy_env(spec, cfg)
    if spec == "expert":
        return ExpertPolicy()
    if spec == "random":
        return RandomPolicy(int(cfg.get("seed", 0)))
    if spec.startswith(("ws://", "wss://")):
        from selfflow_robot.policies.client import WebsocketClientPolicy
        return WebsocketClientPolicy(spec, api_key=cfg.get("api_key"), wait_for_server=float(cfg.get("wait_for_server", 0)))
    from selfflow_robot.policies import Policy
    return Policy.load(spec, device=cfg.get("device", "cpu"), **policy_load_kwargs(cfg))
