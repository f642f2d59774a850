"""Training-side action/state normalisation; writes the `normalization.json` that
`selfflow_robot.policies.normalize.Normalizer` (numpy-only, at run time) reads back.

q99 (default): x = clip(2 (a - q01) / (q99 - q01) - 1, -1, 1); dims with q99 == q01 map to 0.
mean_std:      x = (a - mean) / (std + 1e-6).
Dims whose mask is False (the gripper by default) pass through unchanged.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .store import _write_json_atomic

MODES = ("q99", "mean_std")
STD_EPS = 1e-6
_ALIASES = {"bounds_q99": "q99", "normal": "mean_std"}


class _Stream:
    def __init__(self, stats: dict, mode: str, mask=None):
        self.stats = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()
                      if k in ("mean", "std", "min", "max", "q01", "q99")}
        self.count = stats.get("count")
        self.dim = len(self.stats["q01"])
        self.mask = np.ones(self.dim, bool) if mask is None else np.asarray(mask, dtype=bool)
        if self.mask.shape != (self.dim,):
            raise ValueError(f"normalization mask has {self.mask.size} entries, statistics have {self.dim} dims")
        self.mode = mode

    def normalize(self, a):
        a = np.asarray(a, dtype=np.float64)
        if self.mode == "q99":
            lo, hi = self.stats["q01"], self.stats["q99"]
            rng = hi - lo
            x = np.where(rng > 0, np.clip(2.0 * (a - lo) / np.where(rng > 0, rng, 1.0) - 1.0, -1.0, 1.0), 0.0)
        else:
            x = (a - self.stats["mean"]) / (self.stats["std"] + STD_EPS)
        return np.where(self.mask, x, a).astype(np.float32)

    def unnormalize(self, x):
        x = np.asarray(x, dtype=np.float64)
        if self.mode == "q99":
            lo, hi = self.stats["q01"], self.stats["q99"]
            a = 0.5 * (x + 1.0) * (hi - lo) + lo
        else:
            a = x * (self.stats["std"] + STD_EPS) + self.stats["mean"]
        return np.where(self.mask, a, x).astype(np.float32)

    def to_dict(self) -> dict:
        d = {k: [float(x) for x in v] for k, v in self.stats.items()}
        d["mask"] = [bool(m) for m in self.mask]
        if self.count is not None:
            d["count"] = int(self.count)
        return d


class ActionNormalizer:
    """`ActionNormalizer(store.stats(), mode="q99", mask=[True]*6 + [False])`."""

    def __init__(self, stats: dict, mode: str = "q99", mask=None, state_mask=None):
        mode = _ALIASES.get(mode, mode)
        if mode not in MODES:
            raise ValueError(f"unknown normalization mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        if mask is None:
            mask = stats.get("action_mask") if "action" in stats else None
        action_stats = stats["action"] if "action" in stats else stats
        self.action = _Stream(action_stats, mode, mask)
        state = stats.get("state") if "action" in stats else None
        self.state = _Stream(state, mode, state_mask) if state and state.get("q01") else None

    @classmethod
    def from_store(cls, store, mode: str = "q99", mask=None, episodes=None) -> "ActionNormalizer":
        """Statistics over the store (or the `episodes` subset used); mask defaults to the
        store's meta.action_mask (e.g. the gripper left as is)."""
        stats = store.stats(episodes)
        return cls(stats, mode, mask if mask is not None else store.meta.get("action_mask"))

    def normalize(self, a) -> np.ndarray:
        return self.action.normalize(a)

    def unnormalize(self, x) -> np.ndarray:
        return self.action.unnormalize(x)

    def normalize_state(self, s) -> np.ndarray:
        return np.asarray(s, np.float32) if self.state is None else self.state.normalize(s)

    def to_dict(self) -> dict:
        d = {"mode": self.mode, "action": self.action.to_dict()}
        if self.state is not None:
            d["state"] = self.state.to_dict()
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write normalization.json (saved with every fine-tuning run)."""
        _write_json_atomic(os.fspath(path), self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ActionNormalizer":
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return cls(d, d.get("mode", "q99"), d["action"].get("mask"), (d.get("state") or {}).get("mask"))
