"""Training curves: metrics.jsonl parsing, the plot the trainer redraws, and the curves command."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer_toys import ToyData, ToyModel, ToyObjective, tiny_cfg  # noqa: E402

from selfflow_robot.train import Trainer, make_loader  # noqa: E402
from selfflow_robot.train.curves import plot_curves, read_metrics  # noqa: E402


def _write(path: Path, rows, tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_read_metrics_keeps_finite_numbers_only(tmp_path):
    f = _write(tmp_path / "m.jsonl", [{"step": 1, "loss": 2.0, "epoch": 0, "note": "x", "flag": True},
                                      {"step": 2, "loss": "nan", "eval/mse": 0.5},
                                      {"step": 3, "loss": 1.0}], tail='{"step": 4, "loss"')  # killed mid-line
    assert read_metrics(f) == {"loss": ([1, 3], [2.0, 1.0]), "eval/mse": ([2], [0.5])}


def test_plot_curves_orders_panels_and_overlays_runs(tmp_path):
    a = _write(tmp_path / "a" / "metrics.jsonl", [{"step": s, "loss": 1 / s, "lr": 1e-3, "zeta": s} for s in (1, 2)])
    b = _write(tmp_path / "b" / "metrics.jsonl", [{"step": 2, "eval/val_action_mse": 0.1}])
    out = plot_curves({"a": a, "b": b}, tmp_path / "c.png", title="t")
    assert Path(out).stat().st_size > 5000
    from selfflow_robot.train.curves import _order

    assert _order({"lr", "zeta", "eval/val_action_mse", "loss", "rep"}) == ["loss", "rep", "eval/val_action_mse",
                                                                            "zeta", "lr"]
    assert plot_curves({"e": _write(tmp_path / "e.jsonl", [{"step": 1}])}, tmp_path / "e.png") is None


def test_trainer_draws_curves_at_checkpoints(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(steps=8, checkpoint_every=4)
    trainer = Trainer(cfg, ToyModel(), ToyObjective(), make_loader(ToyData(), 8), tmp_path,
                      logger_cfg=dict(wandb="disabled", progress_bar=False))
    summary = trainer.fit()
    png = tmp_path / "curves.png"
    assert summary["curves_path"] == str(png) and png.stat().st_size > 10_000
    off = Trainer(tiny_cfg(steps=2), ToyModel(), ToyObjective(), make_loader(ToyData(), 8), tmp_path / "off",
                  logger_cfg=dict(wandb="disabled", progress_bar=False, curves=False)).fit()
    assert off["curves_path"] is None and not (tmp_path / "off" / "curves.png").exists()


def test_curves_command(tmp_path):
    for name in ("fm", "sf"):
        _write(tmp_path / name / "metrics.jsonl", [{"step": s, "loss": 1 / s} for s in (1, 2, 3)])
    cmd = [sys.executable, "-m", "selfflow_robot.curves"]
    r = subprocess.run([*cmd, f"runs=[{tmp_path / 'fm'},{tmp_path / 'sf'}]", f"out={tmp_path / 'cmp.png'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cmp.png").stat().st_size > 5000 and "cmp.png" in r.stdout
    r = subprocess.run([*cmd, f"runs={tmp_path / 'fm'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (tmp_path / "fm" / "curves.png").exists()  # one run: beside its metrics
    r = subprocess.run([*cmd, f"runs={tmp_path / 'nowhere'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"no metrics.jsonl at {tmp_path / 'nowhere'}" in r.stderr
