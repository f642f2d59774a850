"""torchrun (gloo, 2 CPU processes): DDP and FSDP2 give the same update as one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from trainer_toys import LOGGER, ToyData, ToyModel, ToyObjective, tiny_cfg
    from selfflow_robot.train import Trainer, make_loader, load_model_weights

    torch.manual_seed(0)
    model = ToyModel()
    if torch.distributed.is_available() and __import__("os").environ.get("RANK", "0") != "0":
        torch.manual_seed(99)  # other ranks start from different weights: the trainer must broadcast
        model = ToyModel()
    objective = ToyObjective(random=False)
    cfg = tiny_cfg(steps={steps}, parallel={parallel!r}, checkpoint_every=2, schedule="constant")
    data = make_loader(ToyData(16), cfg["batch_size"], 0, seed=0)
    trainer = Trainer(cfg, model, objective, data, {run_dir!r}, logger_cfg=LOGGER, resume={resume})
    summary = trainer.fit()
    print("SUMMARY", json.dumps(summary))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, name, nproc, parallel="auto", steps=4, resume=False, run_dir=None):
    run_dir = str(run_dir or tmp_path / name)
    script = tmp_path / f"{name}_{steps}.py"
    script.write_text(SCRIPT.format(tests=str(HERE), steps=steps, parallel=parallel, run_dir=run_dir, resume=resume))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(script)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return Path(run_dir)


def final(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / name)


def assert_same(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: the same script in this process (no torchrun environment)."""
    tmp = tmp_path_factory.mktemp("single")
    assert "WORLD_SIZE" not in os.environ
    code = SCRIPT.format(tests=str(HERE), steps=4, parallel="auto", run_dir=str(tmp / "single"), resume=False)
    exec(compile(code, "single_script", "exec"), {"__name__": "single_script"})
    return tmp / "single"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single, parallel):
    two = launch(tmp_path, parallel, 2, parallel=parallel)
    for name in ("model.safetensors", "trainer_state/student.safetensors", "trainer_state/objective.safetensors"):
        assert_same(final(single, name), final(two, name))
    opt1, opt2 = final(single, "trainer_state/optimizer.safetensors"), final(two, "trainer_state/optimizer.safetensors")
    assert_same(opt1, opt2, atol=1e-5)
    state = json.loads((two / "checkpoints" / "step_00000004" / "trainer_state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["parallel"] == parallel
    assert sorted(p.name for p in (two / "checkpoints" / "step_00000004" / "trainer_state").glob("rng_*")) == [
        "rng_rank0.json", "rng_rank1.json"]
    # the gathered EMA weights load into a plain single-device model
    sys.path.insert(0, str(HERE))
    from trainer_toys import ToyModel

    from selfflow_robot.train import load_model_weights

    load_model_weights(ToyModel(), two)


def test_fsdp_resume_matches_straight_run(tmp_path, single):
    """Kill-free variant: stop an FSDP run at 2 steps, resume it to 4 under FSDP."""
    run_dir = launch(tmp_path, "fsdp_resume", 2, parallel="fsdp", steps=2)
    launch(tmp_path, "fsdp_resume", 2, parallel="fsdp", steps=4, resume=True, run_dir=run_dir)
    assert_same(final(single, "trainer_state/student.safetensors"), final(run_dir, "trainer_state/student.safetensors"))
    assert_same(final(single, "model.safetensors"), final(run_dir, "model.safetensors"))
