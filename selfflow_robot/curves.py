"""`python -m selfflow_robot.curves runs=RUN_DIR` (or `'runs=[A,B]' out=compare.png`): training curves.

One panel per metric in each run's metrics.jsonl (losses, validation, grad norm, lr, throughput)
against the step, several runs overlaid. Training already writes <run_dir>/curves.png at every
checkpoint; this redraws it mid-run or compares runs (e.g. the study's arms).
"""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from . import cli


def metrics_file(run: str) -> str:
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise ValueError(f"runs: no metrics.jsonl at {path} (give a run directory or its metrics.jsonl)")
    return path


def main(cfg: DictConfig) -> str:
    from .train.curves import plot_curves

    runs = [str(r) for r in cfg.runs] if OmegaConf.is_list(cfg.runs) else [str(cfg.runs)]
    files = [metrics_file(r) for r in runs]
    dirs = [os.path.dirname(os.path.abspath(f)) for f in files]
    labels = [str(x) for x in cfg.labels] if cfg.labels else [os.path.basename(d) for d in dirs]
    if not cfg.labels and len(set(labels)) < len(labels):  # e.g. several runs/.../finetune
        labels = [os.path.relpath(d) for d in dirs]
    if len(labels) != len(files) or len(set(labels)) != len(labels):
        raise ValueError(f"labels: need {len(files)} distinct names, got {labels}")
    out = cfg.out or (os.path.join(os.path.dirname(files[0]), "curves.png") if len(files) == 1 else "curves.png")
    path = plot_curves(dict(zip(labels, files)), out, title=cfg.title)
    if path is None:
        raise ValueError(f"nothing to plot: no numeric metrics in {', '.join(files)}")
    print(f"wrote {os.path.abspath(path)}")
    return path


if __name__ == "__main__":
    cli.run("curves", main)
