"""SIMPLER scoring: aggregation as the authors do it, MMRV and Pearson, published tables.

numpy only. Rates are fractions in [0, 1]. `REAL_PERF` / `SIMPLER_PERF` are the real-robot and
visual-matching numbers hard-coded in SimplerEnv's `simpler_env/utils/metrics.py`
(docs/evaluation.md, "SIMPLER scores"): index as TABLE[task][policy].
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np

_G, _W = "google_robot_", "widowx_"
REAL_PERF = {
    _G + "pick_coke_can": {"rt-2-x": 0.907, "rt-1-converged": 0.853, "rt-1-15pct": 0.920, "rt-1-x": 0.760,
                           "rt-1-begin": 0.133, "octo-base": 0.293},
    _G + "move_near": {"rt-2-x": 0.733, "rt-1-converged": 0.633, "rt-1-15pct": 0.583, "rt-1-x": 0.450,
                       "rt-1-begin": 0.017, "octo-base": 0.350},
    _G + "open_drawer": {"rt-2-x": 0.333, "rt-1-converged": 0.815, "rt-1-15pct": 0.704, "rt-1-x": 0.519,
                         "rt-1-begin": 0.000, "octo-base": 0.148},
    _G + "close_drawer": {"rt-2-x": 0.630, "rt-1-converged": 0.926, "rt-1-15pct": 0.889, "rt-1-x": 0.741,
                          "rt-1-begin": 0.000, "octo-base": 0.519},
    _G + "place_apple_in_closed_top_drawer": {"rt-2-x": 0.074, "rt-1-converged": 0.185, "rt-1-15pct": 0.185,
                                              "rt-1-x": 0.407, "rt-1-begin": 0.000, "octo-base": 0.000},
    _W + "spoon_on_towel": {"rt-1-x": 0.000, "octo-base": 0.333, "octo-small": 0.417},
    _W + "carrot_on_plate": {"rt-1-x": 0.000, "octo-base": 0.250, "octo-small": 0.083},
    _W + "stack_cube": {"rt-1-x": 0.000, "octo-base": 0.000, "octo-small": 0.125},
    _W + "put_eggplant_in_basket": {"rt-1-x": 0.000, "octo-base": 0.250, "octo-small": 0.400},
}
SIMPLER_PERF = {  # visual matching
    _G + "pick_coke_can": {"rt-2-x": 0.787, "rt-1-converged": 0.857, "rt-1-15pct": 0.710, "rt-1-x": 0.567,
                           "rt-1-begin": 0.027, "octo-base": 0.170},
    _G + "move_near": {"rt-2-x": 0.779, "rt-1-converged": 0.442, "rt-1-15pct": 0.354, "rt-1-x": 0.317,
                       "rt-1-begin": 0.050, "octo-base": 0.042},
    _G + "open_drawer": {"rt-2-x": 0.157, "rt-1-converged": 0.601, "rt-1-15pct": 0.463, "rt-1-x": 0.296,
                         "rt-1-begin": 0.000, "octo-base": 0.009},
    _G + "close_drawer": {"rt-2-x": 0.343, "rt-1-converged": 0.861, "rt-1-15pct": 0.667, "rt-1-x": 0.891,
                          "rt-1-begin": 0.278, "octo-base": 0.444},
    _G + "place_apple_in_closed_top_drawer": {"rt-2-x": 0.037, "rt-1-converged": 0.065, "rt-1-15pct": 0.130,
                                              "rt-1-x": 0.213, "rt-1-begin": 0.000, "octo-base": 0.000},
    _W + "spoon_on_towel": {"rt-1-x": 0.000, "octo-base": 0.125, "octo-small": 0.472},
    _W + "carrot_on_plate": {"rt-1-x": 0.042, "octo-base": 0.083, "octo-small": 0.097},
    _W + "stack_cube": {"rt-1-x": 0.000, "octo-base": 0.000, "octo-small": 0.042},
    _W + "put_eggplant_in_basket": {"rt-1-x": 0.000, "octo-base": 0.431, "octo-small": 0.569},
}
# The metric script's (tools/calc_metrics_evaluation_videos.py) extra rows: real coke-can success per
# orientation, and the combined open/close drawer (the mean of the two columns).
_COKE_BY_ORIENTATION = {  # orientation: {policy: real success}
    "horizontal": {"rt-2-x": 0.92, "rt-1-converged": 0.96, "rt-1-15pct": 1.0, "rt-1-x": 0.88, "rt-1-begin": 0.20,
                   "octo-base": 0.44},
    "vertical": {"rt-2-x": 0.80, "rt-1-converged": 0.88, "rt-1-15pct": 0.96, "rt-1-x": 0.56, "rt-1-begin": 0.00,
                 "octo-base": 0.20},
    "standing": {"rt-2-x": 1.00, "rt-1-converged": 0.72, "rt-1-15pct": 0.80, "rt-1-x": 0.84, "rt-1-begin": 0.20,
                 "octo-base": 0.24},
}
REAL_PERF.update({f"{_G}pick_{o}_coke_can": row for o, row in _COKE_BY_ORIENTATION.items()})


def _drawer_mean(table):
    o, c = table[_G + "open_drawer"], table[_G + "close_drawer"]
    return {p: (o[p] + c[p]) / 2 for p in o if p in c}


REAL_PERF[_G + "drawer"] = _drawer_mean(REAL_PERF)
SIMPLER_PERF[_G + "drawer"] = _drawer_mean(SIMPLER_PERF)
# Variant aggregation: SimplerEnv stores no VA numbers; these are the ones papers print for the
# REAL_PERF policies (the SIMPLER paper's lineage, as copied by CogACT / SpatialVLA). Only the
# combined drawer column exists for VA. No published table has per-orientation sim rates.
SIMPLER_PERF_VARIANT_AGGREGATION = {
    _G + "pick_coke_can": {"rt-2-x": 0.823, "rt-1-converged": 0.898, "rt-1-15pct": 0.813, "rt-1-x": 0.490,
                           "rt-1-begin": 0.022, "octo-base": 0.006},
    _G + "move_near": {"rt-2-x": 0.792, "rt-1-converged": 0.500, "rt-1-15pct": 0.446, "rt-1-x": 0.323,
                       "rt-1-begin": 0.040, "octo-base": 0.031},
    _G + "drawer": {"rt-2-x": 0.353, "rt-1-converged": 0.323, "rt-1-15pct": 0.267, "rt-1-x": 0.294,
                    "rt-1-begin": 0.069, "octo-base": 0.011},
    _G + "place_apple_in_closed_top_drawer": {"rt-2-x": 0.206, "rt-1-converged": 0.026, "rt-1-x": 0.101,
                                              "octo-base": 0.000},
}
SIM_TABLES = {"visual_matching": SIMPLER_PERF, "variant_aggregation": SIMPLER_PERF_VARIANT_AGGREGATION}
# Plan task names that report into a REAL_PERF column (orientation / drawer tasks roll up).
REPORT_TASK = {
    **{f"{_G}pick_{o}_coke_can": _G + "pick_coke_can" for o in ("horizontal", "vertical", "standing")},
    **{f"{_G}{v}_{d}_drawer": f"{_G}{v}_drawer" for v in ("open", "close") for d in ("top", "middle", "bottom")},
    _G + "move_near_v0": _G + "move_near",
}
CONVENTIONS = ("official", "pooled")


def pearson_correlation(perf_sim: Sequence[float], perf_real: Sequence[float]) -> float:
    """Pearson r with SimplerEnv's conventions (1 when both centred vectors are equal)."""
    sim, real = np.asarray(perf_sim, dtype=np.float64), np.asarray(perf_real, dtype=np.float64)
    if sim.shape != real.shape:
        raise ValueError(f"shape mismatch {sim.shape} vs {real.shape}")
    sim, real = sim - sim.mean(), real - real.mean()
    if np.all(sim == real):
        return 1.0
    return float(np.sum(sim * real) / (np.sqrt(np.sum(sim ** 2) * np.sum(real ** 2)) + 1e-8))


def mean_maximum_rank_violation(perf_sim: Sequence[float], perf_real: Sequence[float]) -> float:
    """MMRV(sim, real): per policy, the largest real-performance gap to any policy whose order
    sim gets wrong; averaged. Asymmetric: argument order is (sim, real)."""
    sim, real = np.asarray(perf_sim, dtype=np.float64), np.asarray(perf_real, dtype=np.float64)
    if sim.shape != real.shape:
        raise ValueError(f"shape mismatch {sim.shape} vs {real.shape}")
    wrong = (sim[:, None] > sim[None, :]) != (real[:, None] > real[None, :])
    gaps = np.where(wrong, np.abs(real[:, None] - real[None, :]), 0.0)
    return float(gaps.max(axis=1).mean())


def sim_real_metrics(sim: Mapping[str, Mapping[str, float]], real: Mapping[str, Mapping[str, float]] = REAL_PERF,
                     policies: Iterable[str] | None = None) -> dict[str, dict]:
    """{task: {"mmrv", "pearson", "policies"}} over the policies both tables share (or `policies`)."""
    out = {}
    for task, sim_row in sim.items():
        if task not in real:
            continue
        names = [p for p in (policies or sim_row) if p in sim_row and p in real[task]]
        if len(names) < 2:
            continue
        s, r = [sim_row[p] for p in names], [real[task][p] for p in names]
        out[task] = {"mmrv": mean_maximum_rank_violation(s, r), "pearson": pearson_correlation(s, r),
                     "policies": names}
    return out


def vs_real(rates: Mapping[str, float], policy: str, setting: str) -> dict:
    """MMRV / Pearson with our rates in `policy`'s place in the published sim table of `setting`
    (visual matching and variant aggregation never mix). `rates`: {report task or
    google_robot_pick_<orientation>_coke_can: rate}. Rows whose published sim numbers do not exist
    (per-orientation coke can, VA open/close drawer) are listed under "missing"."""
    if setting not in SIM_TABLES:
        raise ValueError(f"setting must be one of {tuple(SIM_TABLES)}, got '{setting}'")
    table = SIM_TABLES[setting]
    sim, missing = {}, []
    for task, rate in rates.items():
        if task not in REAL_PERF or policy not in REAL_PERF[task]:
            continue
        if task in table:
            sim[task] = dict(table[task], **{policy: rate})
        else:
            missing.append(task)
    table_name = ("SimplerEnv's SIMPLER_PERF (visual matching)" if setting == "visual_matching" else
                  "published variant-aggregation numbers (papers)")
    return {"setting": setting, "table": table_name, "policy": policy, "rows": sim_real_metrics(sim, REAL_PERF),
            "missing": sorted(missing)}


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def aggregate(records: Iterable[Mapping], convention: str = "official") -> dict[str, dict]:
    """Per-report-task success from per-episode records (keys: task, subtask, variant, success).

    official: mean over episodes per (subtask, variant); then the mean over variants (URDF
      recolourings for VM, scene variants for VA, unweighted); then the mean over subtasks
      (coke-can orientations; top/middle/bottom drawers). Open and close drawer stay separate
      columns; `drawer` is their mean, as the papers' "open/close drawer".
    pooled: every episode of the task weighs the same.
    -> {report_task: {"success": rate, "episodes": n, "subtasks": {subtask: rate},
                      "variants": {variant: episode-weighted rate over its subtasks}}}
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got '{convention}'")
    cells: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        task = REPORT_TASK.get(r["task"], r["task"])
        cells[task][r.get("subtask") or task][r.get("variant") or "default"].append(float(bool(r["success"])))
    out = {}
    for task, subs in cells.items():
        flat = [x for by_var in subs.values() for xs in by_var.values() for x in xs]
        if convention == "pooled":
            sub_rates = {s: _mean([x for xs in v.values() for x in xs]) for s, v in subs.items()}
            rate = _mean(flat)
        else:
            sub_rates = {s: _mean([_mean(xs) for xs in v.values()]) for s, v in subs.items()}
            rate = _mean(list(sub_rates.values()))
        by_variant: dict[str, list] = defaultdict(list)
        for by_var in subs.values():
            for v, xs in by_var.items():
                by_variant[v] += xs
        out[task] = {"success": rate, "episodes": len(flat), "subtasks": sub_rates,
                     "variants": {v: _mean(xs) for v, xs in by_variant.items()}}
    o, c = out.get(_G + "open_drawer"), out.get(_G + "close_drawer")
    if o and c:
        out[_G + "drawer"] = {"success": (o["success"] + c["success"]) / 2, "episodes": o["episodes"] + c["episodes"],
                              "subtasks": {"open": o["success"], "close": c["success"]}, "variants": {}}
    return out


def overall_averages(rates: Mapping[str, float]) -> dict[str, float]:
    """The two averages papers print for Google Robot: over the 3 classic columns (coke, move
    near, drawer) and over 4 (+ apple); plus the Bridge mean. Only when all columns exist."""
    cols3 = [_G + "pick_coke_can", _G + "move_near", _G + "drawer"]
    cols4 = cols3 + [_G + "place_apple_in_closed_top_drawer"]
    bridge = [_W + t for t in ("spoon_on_towel", "carrot_on_plate", "stack_cube", "put_eggplant_in_basket")]
    out = {}
    for name, cols in (("google_3_task_mean", cols3), ("google_4_task_mean", cols4), ("bridge_4_task_mean", bridge)):
        if all(c in rates for c in cols):
            out[name] = float(np.mean([rates[c] for c in cols]))
    return out
