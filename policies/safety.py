"""Safety limits on actions (numpy only), applied in this order:

1. non-finite guard: a chunk/step with NaN or inf is replaced by the "hold" action and flagged;
2. clip in normalised space (before un-normalising; masked dims only) - `normalized_clip`;
3. absolute bounds in robot units - `action_low` / `action_high`, and by default the training data's
   range of every dimension widened by `data_margin` (the gripper too, which normalisation leaves alone);
4. per-step delta limit relative to the previously executed action - `max_delta`.
"Hold" keeps the robot still: zeros for delta-action robots (`hold="zeros"`, with
`hold_keep_dims` such as the gripper keeping their last value) or the last executed action
for absolute-position robots (`hold="last"`). A watchdog that stops the arm when no action
arrives within k*dt belongs on the robot side.
`SafetyFilter.counts` counts what the filter did since the last reset (`Policy.safety_counts`):
chunks / held_chunks / clipped_chunks / delta_limited_chunks for whole chunks (Policy.infer), and
steps / held_steps / clipped_steps / delta_limited_steps for executed actions (Policy.act).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

HOLD_MODES = ("zeros", "last")
COUNT_KEYS = ("chunks", "held_chunks", "clipped_chunks", "delta_limited_chunks",
              "steps", "held_steps", "clipped_steps", "delta_limited_steps")


def add_counts(counts: dict, kind: str, flags: dict) -> None:
    """Count one chunk (kind "chunk") or executed step ("step") and what the safety layer did to it."""
    counts[f"{kind}s"] += 1
    for flag, name in (("hold", "held"), ("clipped", "clipped"), ("delta_limited", "delta_limited")):
        counts[f"{name}_{kind}s"] += bool(flags.get(flag))


def data_range(normalization: dict | None) -> tuple[list, list] | None:
    """The training data's per-dim action range from normalization.json: min/max, else q01/q99."""
    action = (normalization or {}).get("action") or {}
    for lo, hi in (("min", "max"), ("q01", "q99")):
        if action.get(lo) is not None and action.get(hi) is not None:
            return list(action[lo]), list(action[hi])
    return None


def _show(v):
    return list(v) if not isinstance(v, (str, bytes)) and hasattr(v, "__iter__") else v


def _array(name: str, v) -> np.ndarray:
    """A scalar or a flat list of numbers as float64, or a ValueError naming the field."""
    try:
        a = np.asarray(list(v) if hasattr(v, "__iter__") and not isinstance(v, (str, bytes)) else v, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"safety.{name} must be a number or a list of numbers, got {v!r}") from None
    if a.ndim > 1 or isinstance(v, (bool, str, bytes)):
        raise ValueError(f"safety.{name} must be a number or a list of numbers, got {v!r}")
    return a


@dataclass
class SafetyConfig:
    normalized_clip: float | str | None = "auto"  # "auto": 1.0 in q99 mode, off in mean_std mode
    action_low: list[float] | None = None
    action_high: list[float] | None = None
    max_delta: float | list[float] | None = None  # per step, robot units, |a_t - a_{t-1}|
    hold: str = "zeros"
    hold_keep_dims: list[int] = field(default_factory=list)
    # Bound every dim to the training data's [min, max] widened by this fraction of the range on each
    # side (q01/q99 when normalization.json has no min/max); None: off. Meets action_low/high (both apply).
    data_margin: float | None = 0.1

    def __post_init__(self):
        if self.hold not in HOLD_MODES:
            raise ValueError(f"safety.hold must be one of {HOLD_MODES}, got {self.hold!r}")
        clip = self.normalized_clip
        if isinstance(clip, str):
            if clip != "auto":
                raise ValueError(f"safety.normalized_clip must be 'auto', null or a number > 0, got {clip!r}")
        elif clip is not None:
            # clip <= 0 would map every action to one value (e.g. -1: np.clip(x, 1, -1) = q01 everywhere)
            if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not float(clip) > 0 \
                    or not np.isfinite(float(clip)):
                raise ValueError(f"safety.normalized_clip must be 'auto', null or a number > 0, got {clip!r}")
        m = self.data_margin
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 <= float(m) < float("inf")):
            raise ValueError(f"safety.data_margin must be a number >= 0 (a fraction of the data's range) or null, "
                             f"got {m!r}")
        if self.max_delta is not None:
            d = _array("max_delta", self.max_delta)
            if np.any(np.isnan(d)) or np.any(d < 0):  # NaN would turn every limited action into NaN
                raise ValueError(f"safety.max_delta must be >= 0 (scalar or one per dim), got {_show(self.max_delta)}")
        low = None if self.action_low is None else _array("action_low", self.action_low)
        high = None if self.action_high is None else _array("action_high", self.action_high)
        for name, a in (("action_low", low), ("action_high", high)):
            if a is not None and np.any(np.isnan(a)):
                raise ValueError(f"safety.{name} contains NaN: {_show(getattr(self, name))}")
        if low is not None and high is not None:
            if low.ndim == high.ndim == 1 and low.shape != high.shape:
                raise ValueError(f"safety.action_low has {low.shape[0]} entries but safety.action_high has "
                                 f"{high.shape[0]}; give one bound per action dim in both")
            if np.any(low > high):
                raise ValueError(f"safety.action_low > safety.action_high in some dimension "
                                 f"(low {_show(self.action_low)}, high {_show(self.action_high)})")

    def clip_value(self, mode: str | None) -> float | None:
        if self.normalized_clip == "auto":
            return 1.0 if mode == "q99" else None
        return None if self.normalized_clip is None else float(self.normalized_clip)


class SafetyFilter:
    def __init__(self, cfg: SafetyConfig | None, action_dim: int, norm_mode: str | None = None,
                 norm_mask: np.ndarray | None = None, data_range: tuple | None = None):
        """data_range: the training data's (low, high) per dim (safety.data_range(normalization))."""
        self.cfg = cfg or SafetyConfig()
        self.dim = int(action_dim)
        self.clip = self.cfg.clip_value(norm_mode) if norm_mode is not None else None
        self.mask = np.ones(self.dim, bool) if norm_mask is None else np.asarray(norm_mask, bool)
        self.low = self._vec(self.cfg.action_low, "action_low")
        self.high = self._vec(self.cfg.action_high, "action_high")
        if data_range is not None and self.cfg.data_margin is not None:
            self._bound_to_data(data_range, float(self.cfg.data_margin))
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.max_delta = self._vec(self.cfg.max_delta, "max_delta")
        bad = [d for d in self.cfg.hold_keep_dims if not 0 <= int(d) < self.dim]
        if bad:
            raise ValueError(f"hold_keep_dims {bad} out of range for action_dim {self.dim}")

    def _bound_to_data(self, data_range: tuple, margin: float) -> None:
        lo, hi = (self._vec(x, "data range (normalization.json)") for x in data_range)
        lo, hi = lo - margin * (hi - lo), hi + margin * (hi - lo)
        self.low = lo if self.low is None else np.maximum(self.low, lo)
        self.high = hi if self.high is None else np.minimum(self.high, hi)
        empty = np.flatnonzero(self.low > self.high).tolist()
        if empty:
            raise ValueError(f"safety.action_low/action_high leave nothing of the training data's range (widened by "
                             f"safety.data_margin={margin:g}) in action dims {empty}: data low {lo[empty].tolist()}, "
                             f"high {hi[empty].tolist()}; fix the bounds, or set safety.data_margin=null")

    def reset_counts(self) -> None:
        self.counts = dict.fromkeys(COUNT_KEYS, 0)

    def _vec(self, v, name):
        if v is None:
            return None
        a = np.broadcast_to(np.asarray(v, dtype=np.float64), (self.dim,)) if np.ndim(v) == 0 \
            else np.asarray(v, dtype=np.float64)
        if a.shape != (self.dim,):
            raise ValueError(f"safety.{name} has {a.shape[0]} entries, action_dim is {self.dim}")
        return a

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        if last is None:
            return np.zeros(self.dim, np.float32)
        if self.cfg.hold == "last":
            return np.asarray(last, np.float32).copy()
        out = np.zeros(self.dim, np.float32)
        keep = [int(d) for d in self.cfg.hold_keep_dims]
        out[keep] = np.asarray(last, np.float32)[keep]
        return out

    def clip_normalized(self, x: np.ndarray) -> tuple[np.ndarray, bool]:
        if self.clip is None:
            return x, False
        y = np.where(self.mask, np.clip(x, -self.clip, self.clip), x)
        return y.astype(np.float32), bool(np.any(y != x))

    def bound(self, a: np.ndarray) -> tuple[np.ndarray, bool]:
        if self.low is None and self.high is None:
            return a, False
        y = np.clip(a, self.low if self.low is not None else -np.inf,
                    self.high if self.high is not None else np.inf).astype(np.float32)
        return y, bool(np.any(y != a))

    def limit_step(self, a: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, bool]:
        if self.max_delta is None or last is None:
            return a, False
        y = np.clip(a, last - self.max_delta, last + self.max_delta).astype(np.float32)
        return y, bool(np.any(y != a))

    def step(self, a: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, dict]:
        """One executed action (robot units): finite guard, bounds, delta limit; counted in `counts`."""
        a, flags = self._step(a, last)
        add_counts(self.counts, "step", flags)
        return a, flags

    def _step(self, a: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, dict]:
        a = np.asarray(a, np.float32)
        if not np.all(np.isfinite(a)):
            return self.hold_action(last), {"hold": True, "clipped": False, "delta_limited": False}
        a, clipped = self.bound(a)
        a, limited = self.limit_step(a, last)
        return a, {"hold": False, "clipped": clipped, "delta_limited": limited}

    def chunk(self, actions: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, dict]:
        """A whole un-normalised chunk: a non-finite value anywhere makes the chunk untrustworthy,
        so every row becomes the hold action; otherwise bounds and deltas row by row."""
        actions = np.asarray(actions, np.float32)
        if not np.all(np.isfinite(actions)):
            hold = self.hold_action(last)
            return np.repeat(hold[None], len(actions), 0), {"hold": True, "clipped": False, "delta_limited": False}
        out = np.empty_like(actions)
        flags = {"hold": False, "clipped": False, "delta_limited": False}
        prev = last
        for i, a in enumerate(actions):
            out[i], f = self._step(a, prev)
            flags["clipped"] |= f["clipped"]
            flags["delta_limited"] |= f["delta_limited"]
            prev = out[i]
        return out, flags
