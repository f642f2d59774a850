"""Statistics of the pretraining study: sample spreads, bootstrap intervals, paired comparisons and
the smallest difference a configuration can detect.

Every spread is a sample standard deviation (ddof=1), labelled "sd" in reports; every interval is
a 95% percentile bootstrap of the mean. Comparisons between arms are paired: both arms are scored
on the same units (the same seed and environment seed), and the bootstrap resamples those units,
so the noise the arms share (an easy env seed, a lucky seed) cancels out.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np


def sample_sd(values) -> float:
    """Sample standard deviation (ddof=1); nan for fewer than two values."""
    x = np.asarray(values, dtype=float)
    return float(x.std(ddof=1)) if x.size >= 2 else float("nan")


def bootstrap_ci(values, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; (nan, nan) for no values."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_bootstrap(a, b, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> dict:
    """b - a over paired units (a[i] and b[i] measured on the same unit): mean difference, its
    percentile bootstrap interval, and the fraction of resamples in which b does not beat a
    (a one-sided bootstrap p-value for "b > a")."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two 1-d arrays of the same length, got {a.shape} and {b.shape}")
    d = b - a
    if d.size == 0:
        raise ValueError("paired_bootstrap needs at least one pair")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float(d.mean()), "ci": (float(lo), float(hi)), "n": int(d.size),
            "p_not_better": float((means <= 0).mean())}


def min_detectable_difference(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired test at `alpha` detects with `power`,
    for n paired units whose differences have standard deviation sd: (z_a/2 + z_power) sd / sqrt(n)."""
    if n < 1:
        return float("nan")
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return float(z * sd / np.sqrt(n))


def success_mdd(episodes: int, p: float = 0.5, alpha: float = 0.05, power: float = 0.8) -> float:
    """Worst-case (p = 0.5, independent outcomes) detectable success-rate difference between two arms
    scored on `episodes` shared episodes each: the sd of a difference of two Bernoulli(p) outcomes is
    sqrt(2 p (1 - p)); pairing on shared env seeds can only lower it."""
    return min_detectable_difference(episodes, float(np.sqrt(2 * p * (1 - p))), alpha, power)


def summarize(values) -> dict:
    """mean, sample sd (ddof=1), 95% bootstrap interval and n of per-seed values."""
    x = [float(v) for v in values if v is not None and np.isfinite(v)]
    lo, hi = bootstrap_ci(x)
    return {"mean": float(np.mean(x)) if x else float("nan"), "sd": sample_sd(x), "ci": (lo, hi), "n": len(x)}


def steps_to_reach(target: float, steps, values, higher: bool) -> int | None:
    """First step whose value reaches target (>= when higher is better, else <=); None if never."""
    for s, v in zip(steps, values):
        if (v >= target - 1e-12) if higher else (v <= target + 1e-12):
            return int(s)
    return None
