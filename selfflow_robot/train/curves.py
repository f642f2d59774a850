"""Training curves from `metrics.jsonl`: one panel per metric against the step, several runs overlaid.

The trainer writes `<run_dir>/curves.png` at every checkpoint and at the end, so a run can be
judged at a glance without wandb; `python -m selfflow_robot.curves runs=[A,B]` compares runs.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

# Panels in this order when present; any other numeric metric follows alphabetically.
_FIRST = ("loss", "flow", "flow_video", "flow_action", "rep", "repa", "cos")
_LAST = ("grad_norm", "lr", "samples_per_s", "steps_per_s", "tflops_per_device", "mfu", "nan_skips")
_SKIP = {"step", "epoch"}


def read_metrics(path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values) from a metrics.jsonl; non-finite and non-numeric values and a
    half-written last line are skipped."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = row.get("step")
            for k, v in row.items():
                if k in _SKIP or step is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if math.isfinite(v):
                    steps, values = series.setdefault(k, ([], []))
                    steps.append(int(step))
                    values.append(float(v))
    return series


def _order(keys) -> list[str]:
    first = [k for k in _FIRST if k in keys]
    last = [k for k in _LAST if k in keys]
    rest = sorted(k for k in keys if k not in first and k not in last)
    evals = [k for k in rest if k.startswith("eval/")]
    return first + evals + [k for k in rest if k not in evals] + last


def plot_curves(runs: dict[str, str | os.PathLike], out: str | os.PathLike, title: str | None = None) -> str | None:
    """runs: label -> metrics.jsonl. Writes one PNG; returns its path, or None with nothing to plot."""
    data = {label: read_metrics(path) for label, path in runs.items()}
    keys = _order({k for series in data.values() for k in series})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.4 * rows + 0.4), squeeze=False, layout="constrained")
    for ax, key in zip(axes.flat, keys):
        for i, (label, series) in enumerate(data.items()):
            if key in series:
                steps, values = series[key]
                sparse = len(steps) < 30  # validation metrics: a handful of points, show them
                ax.plot(steps, values, marker="o" if sparse else None, ms=3, lw=1.2, label=label, color=f"C{i}")
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(data) > 1:  # one legend for all panels, where the x label would go
        handles = [plt.Line2D([], [], color=f"C{i}", lw=1.5) for i in range(len(data))]
        fig.legend(handles, list(data), loc="outside lower center", ncols=min(len(data), 6), fontsize=8,
                   title="step; runs:", title_fontsize=8)
    else:
        fig.supxlabel("step", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)
