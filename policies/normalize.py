"""Runtime (numpy-only) action/state normalisation matching `normalization.json`.

File format: {"mode": "q99" | "mean_std",
              "action": {"mean", "std", "min", "max", "q01", "q99": [A floats], "mask": [A bools]},
              "state": {...same keys...} (optional)}
q99 (default):  x = clip(2 (a - q01) / (q99 - q01) - 1, -1, 1), dims with q99 == q01 map to 0;
                inverse a = 0.5 (x + 1) (q99 - q01) + q01.
mean_std:       x = (a - mean) / (std + STD_EPS); inverse a = x (std + STD_EPS) + mean (openpi's form).
Dims whose mask is False (the gripper) pass through unchanged in both directions.
The training-side normaliser lives in selfflow_robot.data; this is the inverse used at run time.
"""
from __future__ import annotations

import json
import os

import numpy as np

MODES = ("q99", "mean_std")
STD_EPS = 1e-6


class Stats:
    """Per-dimension statistics of one stream (action or state)."""

    def __init__(self, d: dict, mode: str, what: str):
        need = ("q01", "q99") if mode == "q99" else ("mean", "std")
        missing = [k for k in need if k not in d]
        if missing:
            raise ValueError(f"normalization '{what}' lacks {missing} needed by mode '{mode}'")
        if not isinstance(d, dict):
            raise ValueError(f"normalization '{what}' must be a mapping of statistics, got {d!r}")
        arrays = {}
        for k in need:
            try:
                arrays[k] = np.asarray(d[k], dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"normalization '{what}.{k}' must be a list of numbers, got {d[k]!r}") from None
        dims = {a.shape for a in arrays.values()}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ValueError(f"normalization '{what}' statistics must be 1-D of equal length, got {dims}")
        self.dim = next(iter(dims))[0]
        mask = d.get("mask")
        self.mask = np.ones(self.dim, bool) if mask is None else np.asarray(mask, dtype=bool)
        if self.mask.shape != (self.dim,):
            raise ValueError(f"normalization '{what}.mask' has {self.mask.shape[0]} entries, expected {self.dim}")
        self.mode = mode
        if mode == "q99":
            self.lo, self.hi = arrays["q01"], arrays["q99"]
            if np.any(self.hi < self.lo):
                raise ValueError(f"normalization '{what}': q99 < q01 in some dimension")
        else:
            self.mean, self.std = arrays["mean"], arrays["std"]

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got shape {x.shape}")
        return x.astype(np.float64)

    def normalize(self, a) -> np.ndarray:
        a = self._check(a)
        if self.mode == "q99":
            rng = self.hi - self.lo
            safe = np.where(rng > 0, rng, 1.0)
            x = np.where(rng > 0, np.clip(2.0 * (a - self.lo) / safe - 1.0, -1.0, 1.0), 0.0)
        else:
            x = (a - self.mean) / (self.std + STD_EPS)
        return np.where(self.mask, x, a).astype(np.float32)

    def unnormalize(self, x) -> np.ndarray:
        x = self._check(x)
        if self.mode == "q99":
            a = 0.5 * (x + 1.0) * (self.hi - self.lo) + self.lo
        else:
            a = x * (self.std + STD_EPS) + self.mean
        return np.where(self.mask, a, x).astype(np.float32)


class Normalizer:
    def __init__(self, d: dict):
        if not isinstance(d, dict) or "action" not in d:
            raise ValueError("normalization must be a dict with an 'action' entry")
        self.mode = d.get("mode", "q99")
        if self.mode not in MODES:
            raise ValueError(f"unknown normalization mode {self.mode!r}; expected one of {MODES}")
        self.action = Stats(d["action"], self.mode, "action")
        self.state = Stats(d["state"], self.mode, "state") if d.get("state") else None
        self.raw = d

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Normalizer":
        with open(path, "rb") as f:
            try:
                d = json.loads(f.read().decode("utf-8"))
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (garbage bytes)
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def unnormalize_action(self, x) -> np.ndarray:
        return self.action.unnormalize(x)

    def normalize_action(self, a) -> np.ndarray:
        return self.action.normalize(a)

    def normalize_state(self, s) -> np.ndarray:
        return s if self.state is None else self.state.normalize(s)
