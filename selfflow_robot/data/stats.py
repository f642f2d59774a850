"""Per-dimension statistics (mean, std, min, max, q01, q99, count) of a [N, D] array."""
from __future__ import annotations

import numpy as np

STAT_KEYS = ("mean", "std", "min", "max", "q01", "q99")


def array_stats(x: np.ndarray) -> dict:
    """Exact statistics per column; quantiles use numpy's default linear interpolation."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a [N, D] array, got shape {x.shape}")
    if x.shape[0] == 0:
        return {k: [] for k in STAT_KEYS} | {"count": 0}
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    out = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0), "q01": q01, "q99": q99}
    return {k: [float(v) for v in out[k]] for k in STAT_KEYS} | {"count": int(x.shape[0])}
