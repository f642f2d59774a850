"""What a new user meets on the headline path: the memory check before training, a progress bar
that moves every step, and what Ctrl-C says it kept."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer_toys import LOGGER, ToyData, ToyModel, ToyObjective, tiny_cfg  # noqa: E402

from selfflow_robot.train import Trainer, make_loader  # noqa: E402
from selfflow_robot.train.memory import Estimate, TooLarge, explain  # noqa: E402


def test_progress_bar_moves_every_step_before_the_first_log(tmp_path, monkeypatch):
    import tqdm.auto

    seen = []

    class Recorder(tqdm.auto.tqdm):
        def update(self, n=1):
            seen.append(self.n + n)
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    cfg = tiny_cfg(steps=5, log_every=50, checkpoint_every=0)
    torch.manual_seed(0)
    trainer = Trainer(cfg, ToyModel(), ToyObjective(), make_loader(ToyData(), 8, 0, seed=0), tmp_path,
                      logger_cfg={**LOGGER, "progress_bar": True})
    trainer.fit()
    assert seen == [1, 2, 3, 4, 5]  # not one jump to 5 at the first log step


def test_the_memory_error_says_what_fits():
    gib = 2**30
    est = Estimate(static=gib // 2, per_sample=200 * 2**20, micro_batch=256, processes=1, available=20 * gib,
                   device="cpu")
    assert not est.fits and est.max_micro_batch() == 89  # (0.9 * 20 - 0.5) GiB / 200 MiB
    line = explain(est, 256, 1, 1)
    assert "\n" not in line and "50.5 GiB" in line and "20.0 GiB is available" in line
    assert "trainer.grad_accum_steps=4 (the same batch in micro-batches of 64)" in line
    assert "trainer.batch_size=89" in line and "activation_checkpointing" not in line
    small = Estimate(static=gib // 2, per_sample=10 * 2**20, micro_batch=256, processes=1, available=20 * gib,
                     device="cpu")
    assert "trainer.activation_checkpointing=true" in explain(est, 256, 1, 1, checkpointed=small)
    tiny = Estimate(static=30 * gib, per_sample=1, micro_batch=1, processes=1, available=20 * gib, device="cpu")
    assert "not even one sample fits" in explain(tiny, 8, 1, 1)
    assert Estimate(1, 1, 1, 1, available=0, device="cpu").fits  # unknown memory: never refused


def test_ctrl_c_says_what_the_run_has_on_disk(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from selfflow_robot import jobs
    from selfflow_robot.cli import reported_errors

    cfg = OmegaConf.create({"trainer": {"checkpoint_every": 5000}})

    def stopped(cfg, job, where):
        where["run_dir"] = tmp_path
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "_run_training", stopped)
    with pytest.raises(SystemExit) as exit_, reported_errors():
        jobs.run_training(cfg, "finetune")
    assert exit_.value.code == 130
    with pytest.raises(KeyboardInterrupt) as e:
        jobs.run_training(cfg, "finetune")
    said = str(e.value)
    assert "no checkpoint was written yet" in said and "step 5000" in said and "resume=true" not in said

    # after a checkpoint: its path and the command that continues
    step = tmp_path / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010")
    with pytest.raises(KeyboardInterrupt) as e:
        jobs.run_training(cfg, "finetune")
    assert str(step) in str(e.value) and f"run_dir={tmp_path} resume=true" in str(e.value)
    assert "before training started" in jobs.interrupted_message(None, cfg)


def test_evaluate_defaults_to_a_folder_per_policy_and_settings(tmp_path, monkeypatch):
    """A second run with other tasks is not refused as 'a different run': it gets its own folder,
    and the same command again resumes its own."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "simpler_double"))
    from selfflow_robot.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    common = ["env=simpler", "env.backend=fake_simpler_env", "env.image_size=[16,20]", "progress=false",
              "policy=random", "workers=0", "episodes_per_task=1", "max_episode_steps=2", "videos_per_task=0"]
    first = evaluate(common + ["env.task=google_robot_move_near"])
    second = evaluate(common + ["env.task=google_robot_pick_coke_can"])
    again = evaluate(common + ["env.task=google_robot_move_near"])
    assert first["out_dir"] != second["out_dir"] and again["out_dir"] == first["out_dir"]
    root = tmp_path / "outputs" / "eval" / "simpler"
    assert sorted(p.name for p in root.iterdir() if p.name != "hydra") == \
        sorted(Path(s["out_dir"]).name for s in (first, second))
    assert Path(first["out_dir"]).name.startswith("random-")
    assert again["throughput"]["episodes_run"] == 0  # resumed: nothing left to run


def test_default_eval_folder_names_the_checkpoint():
    from selfflow_robot.evaluation.runner import default_out_dir

    cfg = {"checkpoint": "/x/outputs/finetune/2026-12-07_01-00-00/checkpoints/step_00002000", "env": {"name": "metaworld"},
           "max_episode_steps": None, "seed": 1000}
    path = default_out_dir(cfg)
    assert path.startswith("outputs/eval/metaworld/2026-12-07_01-00-00-step_00002000-")
    assert default_out_dir({**cfg, "seed": 1}) != path
    assert "ws-gpu-8000-" in default_out_dir({**cfg, "checkpoint": "ws://gpu:8000"})


def use_like(text: str):
    """Stands in for a robot's sentence encoder (RT-1's USE): a 4-d vector from the words."""
    return [float(len(text)), float(text.count(" ")), 1.0, 0.0]


def test_an_embedding_policy_takes_a_pluggable_text_encoder():
    import numpy as np

    from selfflow_robot.policies import Policy
    from selfflow_robot.policies.policy import ObservationError

    seen = []

    def predict(obs):
        seen.append(obs["instruction_embedding"])
        return np.zeros((2, 3), np.float32)

    meta = {"action_dim": 3, "text": "embedding", "instruction_embedding_dim": 4}
    img = np.zeros((8, 10, 3), np.uint8)
    with pytest.raises(ObservationError, match="text_encoder='module:function'"):  # a sentence alone: say how
        Policy(predict, meta).infer({"image": img, "instruction": "pick coke can"})
    p = Policy(predict, meta, text_encoder="tests.test_headline_path:use_like")
    p.infer({"image": img, "instruction": "pick coke can"})
    np.testing.assert_array_equal(seen[-1], [13, 2, 1, 0])
    p.reset("open drawer")
    p.infer({"image": img})  # the reset's instruction
    np.testing.assert_array_equal(seen[-1], [11, 1, 1, 0])
    given = np.ones(4, np.float32)
    p.infer({"image": img, "instruction": "x", "instruction_embedding": given})  # the robot's own vector wins
    np.testing.assert_array_equal(seen[-1], given)
    with pytest.raises(ValueError, match="returned 2 values"):
        Policy(predict, meta, text_encoder=lambda t: [0.0, 1.0]).infer({"image": img, "instruction": "go"})
    with pytest.raises(ValueError, match="has no 'nope'"):
        Policy(predict, meta, text_encoder="tests.test_headline_path:nope")
    with pytest.raises(ValueError, match="module:function"):
        Policy(predict, meta, text_encoder="no_colon")
    with pytest.raises(ValueError, match="needs no encoder"):
        Policy(predict, {"action_dim": 3, "text": "bytes"}, text_encoder=use_like)


def test_finetune_refuses_a_run_that_cannot_fit_before_its_first_step(tmp_path, monkeypatch):
    from selfflow_robot import jobs
    from selfflow_robot.cli import compose
    from selfflow_robot.train import memory
    from tests.data_fixtures import write_blob_store

    store = write_blob_store(tmp_path / "store")
    args = ["dataset=store", f"data_dir={store}", "model=tiny", "trainer.batch_size=8", "trainer.num_workers=0",
            "trainer.steps=1", "trainer.warmup_steps=0", "trainer.ema_decay=0.5", "clip.image_size=[32,32]",
            "logger.wandb=disabled", "logger.progress_bar=false", "validation.fraction=0"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)  # a 1 MiB machine
    with pytest.raises(TooLarge, match=r"trainer.batch_size=8 needs ~.* GiB of cpu memory .* not even one sample"):
        jobs.run_training(compose("finetune", args + [f"run_dir={tmp_path / 'a'}"]), "finetune")
    assert not (tmp_path / "a" / "checkpoints").exists()  # refused before training
    # the check measures without touching the RNG: a run with it is the run without it
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**40)
    checked = jobs.run_training(compose("finetune", args + [f"run_dir={tmp_path / 'b'}"]), "finetune")
    unchecked = jobs.run_training(compose("finetune", args + [f"run_dir={tmp_path / 'c'}",
                                                              "trainer.memory_check=false"]), "finetune")
    assert checked["final_step"] == 1 and checked["last_loss"] == unchecked["last_loss"]


def test_hydra_log_goes_where_the_readme_says(tmp_path):
    """With run_dir=..., Hydra's log and .hydra/ are written into the run's directory (and nothing
    under outputs/): the README says so."""
    import os
    import subprocess

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "selfflow_robot.finetune", "dataset=store",
                           f"data_dir={tmp_path / 'missing'}", f"run_dir={run_dir}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode != 0 and "missing" in proc.stderr  # stops at the data, after Hydra set up its files
    assert (run_dir / "finetune.log").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / "outputs").exists()
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "Hydra's log stays in the former" not in readme
    assert "Hydra's log `<command>.log` and `.hydra/` go into the run's directory" in readme


def test_ctrl_c_after_resuming_from_another_run_says_it_resumes_again(tmp_path):
    from omegaconf import OmegaConf

    from selfflow_robot.jobs import interrupted_message

    other = tmp_path / "other" / "step_00000004"
    other.mkdir(parents=True)
    (other / "model.safetensors").write_bytes(b"")
    cfg = OmegaConf.create({"trainer": {"checkpoint_every": 10}, "resume": str(other)})
    said = interrupted_message(tmp_path / "new", cfg)
    assert f"resumes from {other} again" in said and "step 0" not in said


def test_the_estimate_leaves_the_model_and_the_rng_as_they_were():
    from selfflow_robot.train.memory import estimate

    torch.manual_seed(0)
    model, objective = ToyModel(), ToyObjective()
    batch = {"x": torch.randn(1, 8)}
    state = torch.get_rng_state()
    plain = estimate(model, objective, batch, batch_size=8, accum=2, world=1, device=torch.device("cpu"))
    ckpt = estimate(model, objective, batch, batch_size=8, accum=2, world=1, device=torch.device("cpu"),
                    checkpointing=True)
    assert torch.equal(torch.get_rng_state(), state)  # a run with the check draws what it would without
    assert all("forward" not in b.__dict__ for b in model.blocks)  # the trainer applies its own checkpointing
    assert plain.micro_batch == 4 and plain.per_sample > 0 and ckpt.per_sample > 0
    assert all(p.grad is None for p in model.parameters())
