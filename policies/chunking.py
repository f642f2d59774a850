"""Action-chunk execution: receding horizon and temporal ensembling (numpy only).

A chunk predicted at step t holds actions for steps t .. t+H-1. Every `execute_steps`
steps (or when no stored chunk covers the current step) a new chunk is requested.
- ensemble=False: the newest chunk that covers the step is used (receding horizon, like
  openpi's ActionChunkBroker with execute_steps=H, or Octo's RHCWrapper with k < H).
- ensemble=True: every stored chunk that covers the step votes, weighted w_i = exp(-k i)
  with i = 0 the OLDEST prediction (ACT / Octo / SimplerEnv form; k > 0 favours older,
  k < 0 newer predictions). ACT queries every step, hence execute_steps defaults to 1.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np


@dataclass
class ChunkConfig:
    execute_steps: int | None = None   # steps between queries; None: H (1 when ensembling)
    ensemble: bool = False
    ensemble_k: float = 0.01           # ACT default
    ensemble_horizon: int | None = None  # most chunks that vote; None: all that cover the step

    def __post_init__(self):
        for name in ("execute_steps", "ensemble_horizon"):
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
                setattr(self, name, v)
            # a float would be truncated silently (2.5 -> 2), a string fail only at the first act()
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"chunk.{name} must be an integer >= 1 or None, got {v!r}")
        if not isinstance(self.ensemble, (bool, np.bool_)):
            raise ValueError(f"chunk.ensemble must be true or false, got {self.ensemble!r}")
        k = self.ensemble_k
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k):
            raise ValueError(f"chunk.ensemble_k must be a finite number, got {k!r}")


class ActionChunker:
    def __init__(self, cfg: ChunkConfig | None = None):
        self.cfg = cfg or ChunkConfig()
        self.reset()

    def reset(self) -> None:
        self.t = 0                                   # steps executed so far
        self._chunks: list[tuple[int, np.ndarray]] = []  # (start step, [H, A]) oldest first

    def _period(self, horizon: int) -> int:
        if self.cfg.execute_steps is not None:
            return min(int(self.cfg.execute_steps), horizon)
        return 1 if self.cfg.ensemble else horizon

    def needs_chunk(self) -> bool:
        if not self._chunks:
            return True
        start, chunk = self._chunks[-1]
        return self.t - start >= self._period(len(chunk))

    def push(self, chunk: np.ndarray, start: int | None = None) -> None:
        """Store a chunk predicted from the observation at step `start` (default: the current step).
        A chunk that arrives late (asynchronous inference) starts in the past: its first
        t - start actions were meant for steps already executed and are skipped."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[0] < 1:
            raise ValueError(f"action chunk must be [H, A] with H >= 1, got {chunk.shape}")
        if self._chunks and self._chunks[-1][1].shape[1] != chunk.shape[1]:
            raise ValueError("action dimension changed between chunks")
        self._chunks.append((self.t if start is None else int(start), chunk))

    def pop(self) -> np.ndarray:
        """The action for the current step; advances one step."""
        live = [(s, c) for s, c in self._chunks if s <= self.t < s + len(c)]
        if not live:
            raise RuntimeError("no action chunk covers this step; call push() first (needs_chunk() was True)")
        if self.cfg.ensemble:
            if self.cfg.ensemble_horizon is not None:
                live = live[-int(self.cfg.ensemble_horizon):]
            preds = np.stack([c[self.t - s] for s, c in live]).astype(np.float64)
            w = np.exp(-float(self.cfg.ensemble_k) * np.arange(len(live)))
            action = (w[:, None] * preds).sum(0) / w.sum()
        else:
            s, c = live[-1]
            action = c[self.t - s]
        self.t += 1
        self._chunks = [(s, c) for s, c in live if self.t < s + len(c)]
        return np.asarray(action, dtype=np.float32)

    @property
    def horizon(self) -> int:
        """Length H of the newest chunk (0 before the first)."""
        return len(self._chunks[-1][1]) if self._chunks else 0

    @property
    def queued(self) -> int:
        """Actions left in the newest chunk."""
        if not self._chunks:
            return 0
        s, c = self._chunks[-1]
        return max(0, s + len(c) - self.t)
