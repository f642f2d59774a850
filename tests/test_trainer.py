"""Trainer loop: logging, exact resume, NaN handling, EMA, optimizer groups, schedule, loader."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from trainer_toys import LOGGER, ToyData, ToyModel, ToyObjective, tiny_cfg  # noqa: E402

from selfflow_robot.train import NonFiniteError, Trainer, make_loader  # noqa: E402
from selfflow_robot.train.loader import ResumableSampler  # noqa: E402
from selfflow_robot.train.optim import lr_at, param_groups  # noqa: E402


def run(run_dir, cfg=None, objective=None, data=None, resume=False, **kw):
    torch.manual_seed(0)
    model = ToyModel()
    cfg = cfg or tiny_cfg()
    objective = ToyObjective(**(objective or {}))  # built after seeding: same init in every run
    data = data or make_loader(ToyData(), cfg["batch_size"], cfg["num_workers"], seed=cfg["seed"])
    trainer = Trainer(cfg, model, objective, data, run_dir, logger_cfg=LOGGER, resume=resume, **kw)
    return trainer, trainer.fit()


def losses(run_dir, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_fit_logs_and_checkpoints(tmp_path):
    cfg = tiny_cfg(steps=30, keep_last=2, schedule="constant")
    trainer, summary = run(tmp_path, cfg, config={"model": {"name": "toy"}},
                           extra_files={"normalization.json": {"mode": "q01_q99"}})
    assert summary["final_step"] == trainer.step == 30
    assert set(summary) >= {"final_step", "last_loss", "metrics_path", "checkpoint", "steps_per_s", "samples_per_s"}
    rows = [json.loads(l) for l in Path(summary["metrics_path"]).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "steps_per_s", "samples_per_s", "flow", "rep"} <= set(rows[0])
    assert rows[-1]["samples_per_s"] == pytest.approx(rows[-1]["steps_per_s"] * 8, rel=1e-6)
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])  # it learns
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000028", "step_00000030"]  # keep_last=2
    assert (root / "latest").read_text().strip() == "step_00000030"
    ck = Path(summary["checkpoint"])
    assert json.loads((ck / "config.json").read_text()) == {"model": {"name": "toy"}}
    assert "name: toy" in (ck / "config.yaml").read_text()
    assert json.loads((ck / "normalization.json").read_text()) == {"mode": "q01_q99"}
    ema = load_file(ck / "model.safetensors")
    assert set(ema) == set(trainer.model.state_dict())  # plain keys, buffers included
    for k, v in trainer.ema_model.state_dict().items():
        assert torch.equal(ema[k], v)
    student = load_file(ck / "trainer_state" / "student.safetensors")
    assert torch.equal(student["head.weight"], trainer.model.head.weight.detach())
    assert not torch.equal(student["head.weight"], ema["head.weight"])
    assert "proj.weight" in load_file(ck / "trainer_state" / "objective.safetensors")
    state = json.loads((ck / "trainer_state" / "state.json").read_text())
    assert state["step"] == 30 and (state["epoch"], state["batch_in_epoch"]) == (14, 2)  # 2 batches per epoch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(tmp_path, num_workers):
    cfg = tiny_cfg(num_workers=num_workers)
    straight, _ = run(tmp_path / "a", cfg)
    # "Kill" the second run inside step 10: checkpoints exist at 4 and 8, metrics up to 9.
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", cfg, objective=dict(fail_at_call=10))
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert max(losses(tmp_path / "b")) == 9
    resumed, summary = run(tmp_path / "b", cfg, resume=True)
    assert summary["final_step"] == 12
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bitwise: same floats in JSON
    for name in ("model.safetensors", "trainer_state/student.safetensors", "trainer_state/objective.safetensors",
                 "trainer_state/optimizer.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step_00000012" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step_00000012" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_resume_when_finished_or_missing(tmp_path):
    _, first = run(tmp_path, tiny_cfg(steps=4))
    _, again = run(tmp_path, tiny_cfg(steps=4), resume=True)  # nothing left to do
    assert again["final_step"] == 4 and again["checkpoint"] == first["checkpoint"]
    assert isinstance(first["last_loss"], float) and again["last_loss"] is None  # not NaN: nothing trained
    _, fresh = run(tmp_path / "new", tiny_cfg(steps=2), resume=True)  # no checkpoint yet: start at 0
    assert fresh["final_step"] == 2
    with pytest.raises(FileNotFoundError):
        run(tmp_path / "x", tiny_cfg(steps=2), resume=str(tmp_path / "nowhere"))


def test_resume_on_another_number_of_processes_warns(tmp_path):
    run(tmp_path, tiny_cfg(steps=2))
    state_file = tmp_path / "checkpoints" / "step_00000002" / "trainer_state" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))  # as if saved under torchrun with 2 ranks
    with pytest.warns(UserWarning, match="saved by 2 process.* on 1: .*noise streams differ"):
        _, summary = run(tmp_path, tiny_cfg(steps=4), resume=True)
    assert summary["final_step"] == 4


def test_nan_raises_without_touching_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 6: loss.*step_00000004") as e:
        run(tmp_path, tiny_cfg(), objective=dict(nan_at_calls=(6,)))
    names = str(e.value).split(": ", 1)[1].split(" (")[0].split(", ")
    assert len(names) == len(set(names)), names  # each non-finite value named once
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert load_file(root / "step_00000004" / "model.safetensors")  # readable


def test_non_finite_gradient_is_named(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 2: grad_norm \(loss=[0-9.]+, grad_norm=nan\)"):
        run(tmp_path, tiny_cfg(), objective=dict(grad_nan_at_calls=(2,)))


def test_nan_skip(tmp_path):
    cfg = tiny_cfg(on_nan="skip", max_nan_skips=1)
    with pytest.warns(UserWarning, match="step 3"):
        trainer, summary = run(tmp_path / "a", cfg, objective=dict(nan_at_calls=(3,)))
    assert summary["nan_skips"] == 1 and summary["final_step"] == 12
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    with pytest.raises(NonFiniteError, match="step 5"), pytest.warns(UserWarning):
        run(tmp_path / "b", cfg, objective=dict(nan_at_calls=(3, 5)))


def test_ema_update_and_properties(tmp_path):
    torch.manual_seed(0)
    model = ToyModel()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(tiny_cfg(steps=1, ema_decay=0.75, checkpoint_every=0), model, ToyObjective(),
                      make_loader(ToyData(), 8), tmp_path, logger_cfg=LOGGER)
    assert not trainer.ema_model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in trainer.ema_model.parameters())
    trainer.fit()
    for name, p in trainer.model.named_parameters():
        expected = 0.75 * init[name] + 0.25 * p.detach()
        torch.testing.assert_close(dict(trainer.ema_model.named_parameters())[name], expected)
    assert (tmp_path / "checkpoints" / "step_00000001").is_dir()  # final checkpoint even with checkpoint_every=0


def test_param_groups_skip_decay_on_norms_biases_embeddings():
    model = ToyModel()
    decay, no_decay = param_groups({"model": model}, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == ["aux.weight", "blocks.0.fc.weight",
                                                              "blocks.1.fc.weight", "head.weight"]
    assert {"t_embed.weight", "x_embed.weight", "norm.weight", "head.bias"} <= {names[id(p)] for p in no_decay["params"]}


def test_lr_schedule():
    cfg = tiny_cfg(lr=1.0, warmup_steps=4, steps=14, schedule="cosine", min_lr_ratio=0.1)
    from omegaconf import OmegaConf

    c = OmegaConf.create(cfg)
    assert [lr_at(s, c) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, c) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(14, c) == pytest.approx(0.1)
    c.schedule = "constant"
    assert lr_at(100, c) == 1.0


def test_sampler_position_and_sharding():
    full = ResumableSampler(21, seed=3, batch_size=4)
    full.set_epoch(2)
    order = list(full)  # whole batches only (drop_last): 5 of 4
    assert len(order) == 20 and len(set(order)) == 20 and set(order) < set(range(21))
    assert len(ResumableSampler(21, seed=3, batch_size=4, drop_last=False)) == 21
    # gradient accumulation: an epoch holds whole optimizer steps (3 micro-batches of 3 here)
    assert list(ResumableSampler(21, seed=3, batch_size=3, group=3)) == list(ResumableSampler(21, seed=3, batch_size=9))
    assert len(ResumableSampler(21, seed=3, batch_size=3, group=3)) == 18
    part = ResumableSampler(21, seed=3, batch_size=4)
    part.set_position(2, 3)
    assert list(part) == order[12:]
    # two ranks with per-rank batch 2 see exactly the global batch of 4 of one process
    ranks = [ResumableSampler(20, rank=r, world_size=2, seed=1, batch_size=2) for r in range(2)]
    single = list(ResumableSampler(20, seed=1, batch_size=4))
    per_rank = [list(s) for s in ranks]
    for step in range(5):
        together = per_rank[0][2 * step:2 * step + 2] + per_rank[1][2 * step:2 * step + 2]
        assert sorted(together) == sorted(single[4 * step:4 * step + 4])


def test_generic_iterable_and_batch_to_device(tmp_path):
    """A plain list of batches (no sampler) works; resume replays to the saved position."""
    data = [{"x": torch.randn(8, 8, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    moved = []

    def to_dev(b):
        moved.append(1)
        return b

    _, s = run(tmp_path, tiny_cfg(steps=5), data=data, batch_to_device=to_dev)
    assert s["final_step"] == 5 and len(moved) == 5
    state = json.loads((Path(s["checkpoint"]) / "trainer_state" / "state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)


def test_eval_fn_logged(tmp_path):
    seen = []

    def eval_fn(ema, step):
        assert not ema.training and not torch.is_grad_enabled()
        seen.append(step)
        return {"score": torch.tensor(float(step))}

    _, s = run(tmp_path, tiny_cfg(steps=6), eval_fn=eval_fn, eval_every=3)
    assert seen == [3, 6]
    rows = [json.loads(l) for l in Path(s["metrics_path"]).read_text().splitlines()]
    assert [r["eval/score"] for r in rows if "eval/score" in r] == [3.0, 6.0]


def test_wandb_offline_and_failed_init(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    from selfflow_robot.train.logging import wandb_mode

    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    torch.manual_seed(0)
    t = Trainer(tiny_cfg(steps=2), ToyModel(), ToyObjective(), make_loader(ToyData(), 8), tmp_path / "w",
                logger_cfg=dict(wandb="auto", progress_bar=False))
    t.fit()
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    state = json.loads((tmp_path / "w" / "checkpoints" / "step_00000002" / "trainer_state" / "state.json").read_text())
    assert state["wandb_run_id"]
    # a failing init (no key, no network) must not stop training
    import wandb

    def broken(*a, **k):
        raise wandb.errors.UsageError("No API key configured")

    monkeypatch.setattr(wandb, "init", broken)
    trainer = Trainer(tiny_cfg(steps=2), ToyModel(), ToyObjective(), make_loader(ToyData(), 8), tmp_path / "z",
                      logger_cfg=dict(wandb="online", progress_bar=False))
    with pytest.warns(UserWarning, match="wandb init failed"):
        assert trainer.fit()["final_step"] == 2


def test_attention_kernel_option(tmp_path):
    class Spy(ToyObjective):
        def forward(self, model, ema_model, batch):
            self.flash_allowed = torch.backends.cuda.flash_sdp_enabled()
            self.math_allowed = torch.backends.cuda.math_sdp_enabled()
            return super().forward(model, ema_model, batch)

    torch.manual_seed(0)
    spy = Spy()
    trainer = Trainer(tiny_cfg(steps=1, attention="math"), ToyModel(), spy, ToyData(), tmp_path / "a", logger_cfg=LOGGER)
    trainer._train_step(next(iter(make_loader(ToyData(), 8, 0))))
    assert spy.math_allowed and not spy.flash_allowed
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the step
    with pytest.raises(ValueError, match="trainer.attention must be"):
        Trainer(tiny_cfg(attention="fast"), ToyModel(), ToyObjective(), ToyData(), tmp_path / "b", logger_cfg=LOGGER)
    with pytest.raises(ValueError, match="cudnn needs a CUDA"):
        Trainer(tiny_cfg(attention="cudnn"), ToyModel(), ToyObjective(), ToyData(), tmp_path / "c", logger_cfg=LOGGER)


def test_unknown_trainer_or_logger_key_is_refused_with_a_hint(tmp_path):
    with pytest.raises(ValueError, match=r"unknown trainer key 'stepz' \(did you mean 'steps'\?\)"):
        Trainer(tiny_cfg(stepz=3), ToyModel(), ToyObjective(), make_loader(ToyData(), 8), tmp_path, logger_cfg=LOGGER)
    with pytest.raises(ValueError, match=r"unknown logger key 'wandbb' \(did you mean 'wandb'\?\)"):
        Trainer(tiny_cfg(), ToyModel(), ToyObjective(), make_loader(ToyData(), 8), tmp_path,
                logger_cfg={**LOGGER, "wandbb": "offline"})


def test_short_run_with_long_run_settings_warns(tmp_path):
    with pytest.warns(UserWarning) as record:
        Trainer(tiny_cfg(steps=10, warmup_steps=20, ema_decay=0.9999), ToyModel(), ToyObjective(),
                make_loader(ToyData(), 8), tmp_path, logger_cfg=LOGGER)
    text = " ".join(str(w.message) for w in record)
    assert "warmup_steps=20 >= trainer.steps=10" in text
    assert "keeps 100% of the initial weights" in text
    assert "set e.g. trainer.ema_decay=0.5" in text  # 1 - 5/10: keeps < 1% of the initialisation
    with pytest.warns(UserWarning, match=r"set e\.g\. trainer\.ema_decay=0\.375$"):  # below the 0.9 already set
        Trainer(tiny_cfg(steps=8, ema_decay=0.9), ToyModel(), ToyObjective(), make_loader(ToyData(), 8),
                tmp_path / "b", logger_cfg=LOGGER)


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    """grad_accum_steps=2 loads each batch of 8 as two micro-batches of 4: same samples, same
    gradients (loss / 2 each), so the same weights and logged losses, across epochs (20 samples:
    whole steps only) and through a resume."""
    objective = {"random": False}
    big, _ = run(tmp_path / "big", tiny_cfg(steps=7), objective)
    cfg = tiny_cfg(steps=7, grad_accum_steps=2)
    micro = make_loader(ToyData(), 8, 0, seed=0, grad_accum_steps=2)
    assert next(iter(micro))["x"].shape[0] == 4
    acc, _ = run(tmp_path / "acc", cfg, objective, data=micro)
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("loss", "grad_norm", "flow"):  # AdamW hides a gradient scale error; the logged norm does not
        assert losses(tmp_path / "acc", key) == pytest.approx(losses(tmp_path / "big", key), rel=1e-5), key
    split = tmp_path / "split"
    run(split, tiny_cfg(steps=3, grad_accum_steps=2), objective, data=make_loader(ToyData(), 8, 0, grad_accum_steps=2))
    resumed, _ = run(split, cfg, objective, data=make_loader(ToyData(), 8, 0, grad_accum_steps=2), resume=True)
    for a, b in zip(big.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # 3 steps in whole batches of 8, then on in micro-batches of 4 (e.g. moved to a smaller GPU): the
    # saved position counts batches of 8 and is converted, so no sample is read twice or skipped
    switched = tmp_path / "switched"
    run(switched, tiny_cfg(steps=3), objective)
    resumed, _ = run(switched, cfg, objective, data=make_loader(ToyData(), 8, 0, grad_accum_steps=2), resume=True)
    for a, b in zip(big.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="grad_accum_steps=2"):  # the loader must split batches to match
        run(tmp_path / "bad", cfg, objective, data=make_loader(ToyData(), 8, 0))
    with pytest.raises(ValueError, match="divisible"):
        make_loader(ToyData(), 8, 0, grad_accum_steps=3)


def test_activation_checkpointing_same_gradients_less_saved_memory(tmp_path):
    """The real backbone and Self-Flow objective: recomputing blocks in backward gives the same
    gradients, saves fewer activation bytes, and leaves keys and no-grad forwards alone."""
    from test_objectives import make_batch

    from selfflow_robot.models import build_model
    from selfflow_robot.objectives import build_objective

    def grads_and_saved(checkpointing):
        torch.manual_seed(0)
        model = build_model("tiny", depth=4, action_dim=7, frame_stride=2, patch_size=8)
        objective = build_objective({"kind": "self_flow"}, model.cfg)
        trainer = Trainer(tiny_cfg(activation_checkpointing=checkpointing), model, objective, [None],
                          tmp_path / str(checkpointing), logger_cfg=LOGGER)
        keys = set(model.state_dict())
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = objective(trainer.model, trainer.ema_model, make_batch())
        loss.backward()
        assert set(model.state_dict()) == keys
        return {n: p.grad.clone() for n, p in trainer.train_module.named_parameters() if p.grad is not None}, sum(saved)

    plain, plain_bytes = grads_and_saved(False)
    recomputed, recomputed_bytes = grads_and_saved(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert recomputed_bytes < 0.5 * plain_bytes


def test_a_trainer_number_that_is_not_one_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"^trainer\.batch_size must be a number, got 'abc'$"):
        Trainer(tiny_cfg(batch_size="abc"), ToyModel(), ToyObjective(), ToyData(), tmp_path, logger_cfg=LOGGER)
    Trainer(tiny_cfg(grad_clip=None, lr="3e-4"), ToyModel(), ToyObjective(), ToyData(), tmp_path / "ok",
            logger_cfg=LOGGER)  # null clip and a numeric string are fine


def test_throughput_leaves_out_checkpoint_writing(tmp_path, monkeypatch):
    # A fake clock for the throughput meter: each reading advances 1 ms, a checkpoint write 100 s.
    # Deterministic under any machine load (a wall-clock version of this test failed on a busy CI).
    import time as real_time
    import types

    from selfflow_robot.train import logging as train_logging

    clock = {"t": 0.0}

    def perf_counter():
        clock["t"] += 1e-3
        return clock["t"]

    fake_time = types.SimpleNamespace(**{k: getattr(real_time, k) for k in dir(real_time) if not k.startswith("_")})
    fake_time.perf_counter = perf_counter
    monkeypatch.setattr(train_logging, "time", fake_time)
    save = Trainer.save_checkpoint

    def slow_save(self):
        clock["t"] += 100.0  # a checkpoint of a large model on a slow disk
        return save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", slow_save)
    run(tmp_path, tiny_cfg(steps=6, checkpoint_every=2))
    rates = losses(tmp_path, "steps_per_s")
    assert min(rates[3], rates[5]) > 1  # the steps right after a checkpoint: not ~1 / 100 s
