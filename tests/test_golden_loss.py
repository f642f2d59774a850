"""Golden loss curves (torchtitan-style): tiny Self-Flow pretraining and fine-tuning runs, seeded and
single-process on CPU, must reproduce the per-step losses stored in tests/golden/. Any change to the
math, the data pipeline, initialisation or the optimiser moves them; if the change is intended,
regenerate with `SELFFLOW_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_loss.py` and say why in
the commit. Tolerance: rtol 2e-3 (fp32 matmul results differ in the last bits between CPUs)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from selfflow_robot.cli import compose
from tests.data_fixtures import write_blob_store

GOLDEN = Path(__file__).parent / "golden"
KEYS = ("loss", "flow", "flow_video", "flow_action", "rep", "cos")
COMMON = ["model=tiny", "model.video_prediction=x", "trainer.batch_size=8", "trainer.num_workers=0", "trainer.warmup_steps=3", "trainer.lr=1e-3",
          "trainer.log_every=1", "trainer.ema_decay=0.9", "trainer.steps=12", "trainer.device=cpu",
          "trainer.precision=fp32", "trainer.checkpoint_every=12", "trainer.measure_mfu=false",
          "logger.wandb=disabled", "logger.progress_bar=false", "logger.curves=false", "clip.image_size=[32,32]"]


def _blob_store(path) -> str:
    """Four episodes of a moving Gaussian blob whose actions are its velocity (fixed seed)."""
    return write_blob_store(path, episodes=4, instruction=lambda ep: "follow the blob", source="golden")


def _curve(run_dir) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {k: [r[k] for r in rows if k in r] for k in KEYS if any(k in r for r in rows)}


@pytest.mark.parametrize("job, extra", [
    ("pretrain", ["objective=self_flow"]),
    ("finetune", ["objective=self_flow", "init=none", "validation.fraction=0"]),
])
def test_golden_loss_curve(tmp_path, job, extra):
    import torch

    from selfflow_robot.jobs import run_training

    store = _blob_store(tmp_path / "store")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, whatever the machine's core count
    try:
        run_training(compose(job, [*COMMON, "dataset=store", f"data_dir={store}", f"run_dir={tmp_path / 'run'}",
                                   *extra]), job)
    finally:
        torch.set_num_threads(threads)
    curve = _curve(tmp_path / "run")
    assert len(curve["loss"]) == 12 and {"rep", "cos"} <= set(curve)
    path = GOLDEN / f"{job}_self_flow_tiny.json"
    if os.environ.get("SELFFLOW_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(curve, indent=1) + "\n")
        pytest.skip(f"wrote {path}")
    golden = json.loads(path.read_text())
    assert set(curve) == set(golden)
    for k in golden:
        np.testing.assert_allclose(curve[k], golden[k], rtol=2e-3, atol=1e-5, err_msg=f"{job} {k}")
