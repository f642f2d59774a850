"""Checkpoint files: weight loading and its errors, config/latest helpers, optimizer/RNG
round trips, atomic publishing and pruning, and no pickle anywhere in the trainer."""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from trainer_toys import LOGGER, ToyData, ToyModel, ToyObjective, tiny_cfg  # noqa: E402

from selfflow_robot.train import (Trainer, latest_checkpoint, load_model_weights, make_loader,  # noqa: E402
                                  read_checkpoint_config)
from selfflow_robot.train import checkpoint as ck  # noqa: E402
from selfflow_robot.train.distributed import DistInfo, parallelize  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt_run")
    torch.manual_seed(0)
    t = Trainer(tiny_cfg(steps=4, checkpoint_every=2), ToyModel(), ToyObjective(), make_loader(ToyData(), 8), d,
                config={"model": {"name": "toy", "depth": 2}}, logger_cfg=LOGGER)
    t.fit()
    return d


def test_latest_and_config(run_dir):
    last = run_dir / "checkpoints" / "step_00000004"
    assert latest_checkpoint(run_dir) == last
    assert latest_checkpoint(run_dir / "checkpoints") == last
    assert latest_checkpoint(run_dir / "checkpoints" / "step_00000002") == run_dir / "checkpoints" / "step_00000002"
    assert latest_checkpoint(run_dir / "nothing") is None
    assert read_checkpoint_config(run_dir) == {"model": {"name": "toy", "depth": 2}}
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_checkpoint_config(run_dir / "nothing")


def test_load_model_weights_roundtrip(run_dir):
    model = ToyModel()
    load_model_weights(model, run_dir)
    saved = load_file(run_dir / "checkpoints" / "step_00000004" / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    load_model_weights(ToyModel(), run_dir / "checkpoints" / "step_00000004" / "model.safetensors")


def test_load_model_weights_names_mismatches(run_dir):
    with pytest.raises(ValueError) as err:
        load_model_weights(ToyModel(d=32), run_dir)
    msg = str(err.value)  # the first 8 of 15 shape mismatches, then a count (not 130 lines for a wrong size)
    assert "(15 mismatches" in msg and "blocks.0.fc.weight: checkpoint (16, 16) vs model (32, 32)" in msg
    assert msg.endswith("... and 7 more") and len(msg.splitlines()) == 10
    with pytest.raises(ValueError, match=r"missing in checkpoint: blocks\.2\.fc\.weight"):
        load_model_weights(ToyModel(depth=3), run_dir)
    with pytest.raises(ValueError, match=r"unexpected in checkpoint: blocks\.1\.norm\.weight"):
        load_model_weights(ToyModel(depth=1), run_dir)
    deeper = ToyModel(depth=3)
    load_model_weights(deeper, run_dir, strict=False)  # shared prefix loads, the extra block stays
    assert torch.equal(deeper.blocks[0].fc.weight, load_file(
        run_dir / "checkpoints" / "step_00000004" / "model.safetensors")["blocks.0.fc.weight"])


def test_trainer_state_layout(run_dir):
    state_dir = run_dir / "checkpoints" / "step_00000004" / "trainer_state"
    assert sorted(p.name for p in state_dir.iterdir()) == [
        "objective.safetensors", "optimizer.json", "optimizer.safetensors", "rng_rank0.json", "state.json",
        "student.safetensors"]
    opt = load_file(state_dir / "optimizer.safetensors")
    assert {"state.model.head.weight.exp_avg", "state.objective.proj.weight.exp_avg_sq"} <= set(opt)
    meta = json.loads((state_dir / "optimizer.json").read_text())
    assert meta["param_groups"][0]["betas"] == [0.9, 0.999]
    assert "model.head.weight" in meta["param_groups"][0]["params"]
    assert not any(k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k
                   for k in load_file(state_dir / "student.safetensors"))


def test_rng_state_roundtrip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in the numpy state
    state = json.loads(json.dumps(ck.rng_state()))
    expected = (random.random(), np.random.randn(3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(state)
    got = (random.random(), np.random.randn(3), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_optimizer_flatten_roundtrip():
    osd = {"state": {"a.b.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}, "c": {"step": 5}},
           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["a.b.weight", "c"]}]}
    tensors, rest = ck.flatten_optimizer_state(osd)
    assert set(tensors) == {"state.a.b.weight.step", "state.a.b.weight.exp_avg"}
    back = ck.unflatten_optimizer_state(tensors, json.loads(json.dumps(rest)))
    assert back["param_groups"] == osd["param_groups"]
    assert back["state"]["c"] == {"step": 5} and torch.equal(back["state"]["a.b.weight"]["exp_avg"], torch.ones(2))


def test_commit_is_atomic_and_prunes(tmp_path):
    for step in (1, 2, 3):
        tmp = ck.tmp_dir_for(tmp_path, step)
        tmp.mkdir(parents=True)
        ck.save_tensors({"w": torch.full((2,), float(step))}, tmp / "model.safetensors")
        ck.commit(tmp_path, tmp, step, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    # a crash while writing leaves only a hidden temp dir: `latest` still names step 3
    half = ck.tmp_dir_for(tmp_path, 4)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == root / "step_00000003"
    # re-publishing an existing step replaces it
    tmp = ck.tmp_dir_for(tmp_path, 3)
    tmp.mkdir()
    ck.save_tensors({"w": torch.zeros(2)}, tmp / "model.safetensors")
    ck.commit(tmp_path, tmp, 3, keep_last=0)
    assert torch.equal(load_file(root / "step_00000003" / "model.safetensors")["w"], torch.zeros(2))


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(3, 3)
    ck.save_tensors({"a": w, "b": w}, tmp_path / "t.safetensors")
    out = load_file(tmp_path / "t.safetensors")
    assert torch.equal(out["a"], out["b"])


def test_compile_keeps_plain_keys():
    model, ema = ToyModel(), ToyModel()
    keys = set(model.state_dict())
    parallelize(model, ema, "none", DistInfo(), compile=True, param_dtype=None)  # lazy: no compile cost here
    assert set(model.state_dict()) == keys == set(ema.state_dict())
    assert ck.clean_state_dict({"module.a._orig_mod.b": 1, "c": 2}) == {"a.b": 1, "c": 2}


def test_no_pickle_in_trainer_sources():
    src = Path(__file__).parents[1] / "selfflow_robot" / "train"
    for f in src.glob("*.py"):
        text = f.read_text()
        assert not re.search(r"torch\.(load|save)\(|\bimport pickle|pickle\.", text), f.name


def test_truncated_weights_and_resume_into_another_model_are_named(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    weights = copy / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file .*truncated"):
        load_model_weights(ToyModel(), copy)
    with pytest.raises(ValueError, match=r"(?s)cannot resume from .*step_00000002: its weights do not fit .*config\.yaml"):
        Trainer(tiny_cfg(steps=4), ToyModel(d=32), ToyObjective(), make_loader(ToyData(), 8), copy,
                logger_cfg=LOGGER, resume=str(copy / "checkpoints" / "step_00000002"))
    # a deeper model: only missing keys (set_model_state_dict's strict=True let these through)
    with pytest.raises(ValueError, match=r"(?s)do not fit .*missing in checkpoint: model\.blocks\.2\."):
        Trainer(tiny_cfg(steps=4), ToyModel(depth=3), ToyObjective(), make_loader(ToyData(), 8), copy,
                logger_cfg=LOGGER, resume=str(copy / "checkpoints" / "step_00000002"))


def test_resume_names_settings_that_differ_from_the_run(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with pytest.warns(UserWarning, match=r"differ from the run's: model\.depth=3 \(run: 2\); the run's settings"):
        Trainer(tiny_cfg(steps=6), ToyModel(), ToyObjective(), make_loader(ToyData(), 8), copy, resume=True,
                config={"model": {"name": "toy", "depth": 3}}, logger_cfg=LOGGER)


def test_weight_files_are_as_readable_as_the_json_beside_them(run_dir):
    """safetensors creates 0600 files; a checkpoint served or evaluated from another account needs them readable."""
    step = run_dir / "checkpoints" / "step_00000004"
    json_mode = (step / "config.json").stat().st_mode & 0o777
    for f in [step / "model.safetensors", *(step / "trainer_state").glob("*.safetensors")]:
        assert f.stat().st_mode & 0o777 == json_mode, f.name


def _publish(run_dir, step, keep_last):
    tmp = ck.tmp_dir_for(run_dir, step)
    tmp.mkdir(parents=True)
    ck.save_tensors({"w": torch.full((2,), float(step))}, tmp / "model.safetensors")
    (tmp / "config.json").write_text("{}")
    return ck.commit(run_dir, tmp, step, keep_last)


def _visible_dirs_all_load(run_dir):
    root = Path(run_dir) / "checkpoints"
    visible = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert all((p / "model.safetensors").is_file() for p in visible), sorted(p.name for p in visible)
    return sorted(p.name for p in visible)


def test_a_kill_while_pruning_leaves_no_visible_half_deleted_checkpoint(tmp_path, monkeypatch):
    _publish(tmp_path, 1, keep_last=1)
    real_rmtree = ck.shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):  # deletes the weights, then the process dies
        if (Path(path) / "model.safetensors").exists():
            (Path(path) / "model.safetensors").unlink()
            raise KeyboardInterrupt("killed while pruning")
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ck.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        _publish(tmp_path, 2, keep_last=1)
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    assert _visible_dirs_all_load(tmp_path) == ["step_00000002"]
    _publish(tmp_path, 3, keep_last=1)  # the next save removes the hidden leftover too
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000003"]


def test_kills_between_save_and_prune_do_not_pile_up(tmp_path):
    def trainer(keep_last):
        torch.manual_seed(0)
        return Trainer(tiny_cfg(steps=4, checkpoint_every=1, keep_last=keep_last), ToyModel(), ToyObjective(),
                       make_loader(ToyData(), 8), tmp_path, logger_cfg=LOGGER, resume=True)

    trainer(0).fit()  # as if each save's prune had been killed: 4 checkpoints
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # left half-deleted by an older version
    assert [p.name for p in ck.list_checkpoints(tmp_path)][-1] == "step_00000004"
    trainer(2)  # resuming prunes what the killed runs left
    assert _visible_dirs_all_load(tmp_path) == ["step_00000003", "step_00000004"]
