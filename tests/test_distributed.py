"""torchrun (gloo, 2 CPU processes): DDP and FSDP2 give the same update as one process, and a
stopped + resumed run under torchrun continues exactly (per-rank RNG, sharded optimizer state)."""
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
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from trainer_toys import LOGGER, ToyData, ToyModel, ToyObjective, tiny_cfg
    from selfflow_robot.train import Trainer, make_loader

    def train(run_dir, steps, resume=False):
        torch.manual_seed(0)
        model = ToyModel()
        if os.environ.get("RANK", "0") != "0":
            torch.manual_seed(99)  # other ranks start from other weights: the trainer must broadcast rank 0's
            model = ToyModel()
        objective = ToyObjective(random={random})
        cfg = tiny_cfg(steps=steps, parallel={parallel!r}, checkpoint_every=2, schedule="constant",
                       grad_accum_steps={accum}, activation_checkpointing={ac})
        data = make_loader(ToyData(16), cfg["batch_size"], 0, seed=0, grad_accum_steps={accum})
        return Trainer(cfg, model, objective, data, run_dir, logger_cfg=LOGGER, resume=resume).fit()

    train({run_dir!r} + "/straight", 4)
    if {resume_check}:
        train({run_dir!r} + "/resumed", 2)            # stop after 2 steps ...
        train({run_dir!r} + "/resumed", 4, resume=True)  # ... and continue to 4 in a fresh Trainer
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_text(run_dir, parallel="auto", random=False, resume_check=False, accum=1, ac=False) -> str:
    return SCRIPT.format(tests=str(HERE), parallel=parallel, run_dir=str(run_dir), random=random,
                         resume_check=resume_check, accum=accum, ac=ac)


def launch(tmp_path, nproc=2, **kw) -> Path:
    script = tmp_path / "train_script.py"
    script.write_text(script_text(tmp_path, **kw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(script)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return tmp_path


def final(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / name)


def assert_same(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: the same script in this process (no torchrun environment)."""
    tmp = tmp_path_factory.mktemp("single")
    assert "WORLD_SIZE" not in os.environ
    exec(compile(script_text(tmp), "single_script", "exec"), {"__name__": "single_script"})
    return tmp / "straight"


@pytest.mark.parametrize("parallel,accum,ac", [("ddp", 1, False), ("fsdp", 1, False), ("ddp", 2, False),
                                               ("fsdp", 2, True)])
def test_two_processes_match_one(tmp_path, single, parallel, accum, ac):
    """accum=2: each rank's share in two micro-batches, gradients synchronised once; ac: blocks
    recomputed in backward inside their FSDP2 units."""
    two = launch(tmp_path, parallel=parallel, accum=accum, ac=ac) / "straight"
    for name in ("model.safetensors", "trainer_state/student.safetensors", "trainer_state/objective.safetensors"):
        assert_same(final(single, name), final(two, name))
    assert_same(final(single, "trainer_state/optimizer.safetensors"),
                final(two, "trainer_state/optimizer.safetensors"), atol=1e-5)
    for step, loss in losses(single).items():
        assert losses(two)[step] == pytest.approx(loss, rel=1e-5)  # the logged loss is the global mean
    state_dir = two / "checkpoints" / "step_00000004" / "trainer_state"
    state = json.loads((state_dir / "state.json").read_text())
    assert state["world_size"] == 2 and state["parallel"] == parallel
    assert sorted(p.name for p in state_dir.glob("rng_*")) == ["rng_rank0.json", "rng_rank1.json"]
    sys.path.insert(0, str(HERE))
    from trainer_toys import ToyModel

    from selfflow_robot.train import load_model_weights

    load_model_weights(ToyModel(), two)  # gathered EMA weights load into a plain model


def test_fsdp_resume_is_exact(tmp_path):
    """Random noise per rank (per-rank RNG files) + sharded optimizer state: resumed == straight."""
    run_dir = launch(tmp_path, parallel="fsdp", random=True, resume_check=True)
    assert losses(run_dir / "straight") == losses(run_dir / "resumed")
    for name in ("model.safetensors", "trainer_state/student.safetensors", "trainer_state/optimizer.safetensors"):
        a, b = final(run_dir / "straight", name), final(run_dir / "resumed", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


MEANS_SCRIPT = textwrap.dedent("""
    import json, os, torch.distributed as dist
    from selfflow_robot.validation import global_means
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    totals = {"val_flow_loss": [1.0, 3.0] if rank == 0 else [8.0], "val_action_mse": [0.5] if rank == 0 else [1.5]}
    with open(f"means_rank{rank}.json", "w") as f:  # not stdout: two ranks' lines can interleave
        json.dump(global_means(totals), f)
    dist.destroy_process_group()
""")


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), *args]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def test_validation_means_cover_every_rank(tmp_path):
    """Each rank validates its own share of the held-out clips; the reported value is over all of them."""
    script = tmp_path / "means.py"
    script.write_text(MEANS_SCRIPT)
    torchrun([str(script)], tmp_path)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"means_rank{rank}.json").read_text()) == {"val_action_mse": 1.0,
                                                                                 "val_flow_loss": 4.0}


@pytest.fixture(scope="module")
def blob_store(tmp_path_factory):
    from tests.data_fixtures import write_blob_store

    return write_blob_store(tmp_path_factory.mktemp("data") / "store")


@pytest.mark.parametrize("parallel,accum", [("ddp", 1), ("fsdp", 2)])
def test_finetune_command_under_torchrun(tmp_path, blob_store, parallel, accum):
    """The real fine-tuning command on two ranks. Its objective calls the model twice per step (joint,
    then action-only samples: once per DDP forward is what DDP allows), validation samples actions
    (root-level weights read outside forward under FSDP2), every rank writes into rank 0's run
    directory, and one rank reports. Micro-batches of 2 (fsdp, accum 2) round the action-only share
    (2 x 0.25) at random: the ranks must agree, or their FSDP2 all-gathers stop matching."""
    out = torchrun(["-m", "selfflow_robot.finetune", "dataset=store", f"data_dir={blob_store}", "model=tiny",
                    "trainer.batch_size=8", "trainer.num_workers=0", "trainer.steps=4", "trainer.log_every=2",
                    "trainer.warmup_steps=1", "trainer.ema_decay=0.5", "validation.every=2", "logger.wandb=disabled",
                    "logger.progress_bar=false", "clip.image_size=[32,32]", f"trainer.parallel={parallel}",
                    f"trainer.grad_accum_steps={accum}",
                    # each rank its own Hydra directory, as when the ranks start a second apart
                    "hydra.run.dir=outputs/rank${oc.env:RANK}"], tmp_path)
    assert [line for line in out.stdout.splitlines() if line.startswith("run: ")] == [f"run: {tmp_path}/outputs/rank0"]
    assert (out.stdout + out.stderr).count("data: ") == 1
    assert (tmp_path / "outputs" / "rank0" / "checkpoints" / "latest").is_file()
    assert not (tmp_path / "outputs" / "rank1" / "checkpoints").exists()
    rows = [json.loads(line) for line in (tmp_path / "outputs" / "rank0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/val_action_mse" in r] == [2, 4]
