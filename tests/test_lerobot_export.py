"""The LeRobot export (selfflow_robot.export lerobot) and the plugin's normalisation maths.

LeRobot itself (Python >= 3.12, torch < 2.12) lives in its own venv: scripts/test_lerobot_plugin.sh
runs the plugin against it (factory loading, parity with Policy.load, lerobot-eval). Here: the
pieces that need no LeRobot, and the plugin tests that skip when it is not installed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfflow_robot import lerobot_format as lf
from selfflow_robot.export_lerobot import export_lerobot, parse_args
from selfflow_robot.policies.normalize import Normalizer
from selfflow_robot.policies.safety import SafetyConfig, SafetyFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "integrations" / "lerobot" / "tests"))
from tiny_checkpoint import tiny_checkpoint  # noqa: E402

# q99 == q01 in dim 1, the last dim masked (a gripper), values far outside [q01, q99] in some rows.
STATS = {"q01": [-1.0, 2.0, 0.0, -5.0], "q99": [3.0, 2.0, 10.0, 5.0], "mean": [0.5, 2.0, 4.0, 0.0],
         "std": [1.0, 0.0, 3.0, 2.0], "mask": [True, True, True, False]}


@pytest.mark.parametrize("mode", ["q99", "mean_std"])
def test_torch_normalisation_equals_the_policy_runtime(mode):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(50, 4)) * 8).astype(np.float32)
    ours = Normalizer({"mode": mode, "action": STATS})
    stream = lf.stream_stats(STATS, mode, "action")
    x = lf.normalize(torch.from_numpy(a), stream, mode)
    assert np.array_equal(x.numpy(), ours.normalize_action(a))
    if mode == "q99":
        assert np.all(x.numpy()[:, 1] == 0) and np.array_equal(x.numpy()[:, 3], a[:, 3])  # zero range; mask
        assert np.abs(x.numpy()[:, :3]).max() == 1.0  # clipped
    # the way back, with Policy.infer's normalized_clip ("auto") first
    y = (rng.normal(size=(50, 4)) * 2).astype(np.float32)
    safety = SafetyFilter(SafetyConfig(), 4, mode, np.array(STATS["mask"]))
    expected = ours.unnormalize_action(safety.clip_normalized(y)[0])
    got = lf.unnormalize(torch.from_numpy(y), stream, mode, lf.default_clip(mode)).numpy()
    assert np.array_equal(got, expected)


def test_lerobots_quantiles_step_would_differ_on_all_three_points():
    """Why the plugin has its own steps: LeRobot's QUANTILES formula, 2 (x - q01) / max(q99 - q01, eps) - 1."""
    a = torch.tensor([[7.0, 2.5, 20.0, 4.0]])
    stream = lf.stream_stats(STATS, "q99", "action")
    ours = lf.normalize(a, stream, "q99")[0]
    q01, q99 = torch.tensor(STATS["q01"]), torch.tensor(STATS["q99"])
    denom = torch.where(q99 - q01 == 0, torch.tensor(1e-8), q99 - q01)
    theirs = (2 * (a - q01) / denom - 1)[0]
    assert ours[0] == 1.0 and theirs[0] > 1.0  # clip
    assert ours[1] == 0.0 and theirs[1] > 1e6  # q99 == q01
    assert ours[3] == 4.0 and theirs[3] != 4.0  # the gripper passes through


def test_stream_stats_refuses_bad_statistics():
    with pytest.raises(ValueError, match="'state' lacks \\['q99'\\]"):
        lf.stream_stats({"q01": [0.0]}, "q99", "state")
    with pytest.raises(ValueError, match="q99 < q01"):
        lf.stream_stats({"q01": [1.0], "q99": [0.0]}, "q99", "action")
    with pytest.raises(ValueError, match="differ in length"):
        lf.stream_stats({"q01": [0.0], "q99": [1.0], "mask": [True, False]}, "q99", "action")


def test_export_writes_what_lerobot_reads(tmp_path):
    views = ["observation.images.top", "observation.images.wrist"]
    ckpt = tiny_checkpoint(tmp_path / "ckpt", views=views, image_size=(32, 64))
    out = export_lerobot(ckpt, tmp_path / "lerobot", sampler_steps=3, n_action_steps=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["type"] == "selfflow" and cfg["chunk_size"] == 4 and cfg["n_action_steps"] == 2
    assert cfg["input_features"] == {"observation.images.top": {"type": "VISUAL", "shape": [3, 32, 32]},
                                     "observation.images.wrist": {"type": "VISUAL", "shape": [3, 32, 32]},
                                     "observation.state": {"type": "STATE", "shape": [3]}}
    assert cfg["output_features"] == {"action": {"type": "ACTION", "shape": [4]}}
    src, dst = load_file(str(Path(ckpt) / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(dst) == sorted(f"model.{k}" for k in src)
    assert all(torch.equal(src[k], dst[f"model.{k}"]) for k in src)
    norm = json.loads((Path(ckpt) / "normalization.json").read_text())
    pre = json.loads((out / "policy_preprocessor.json").read_text())
    post = json.loads((out / "policy_postprocessor.json").read_text())
    assert [s["registry_name"] for s in pre["steps"]][-1] == lf.NORMALIZER_STEP
    streams = pre["steps"][-1]["config"]["streams"]
    assert streams["observation.state"]["q99"] == norm["state"]["q99"]
    assert streams["action"]["mask"] == [True, True, True, False]
    # Policy.load's default bounds: q01/q99 (no min/max here) widened by 10 % of the range
    low, high = post["steps"][0]["config"].pop("low"), post["steps"][0]["config"].pop("high")
    assert np.allclose(low, [-1.2, -2.5, -3.8, -5.1]) and np.allclose(high, [1.2, 3.5, 5.8, 8.1])
    assert post["steps"][0]["config"] == {"mode": "q99", "streams": {"action": streams["action"]}, "clip": 1.0}
    assert cfg["data_margin"] == 0.1


@pytest.mark.parametrize("margin", [0.1, 0.5, None])
def test_exported_postprocessor_gives_policy_loads_actions(tmp_path, margin):
    """A masked (pass-through) dim whose raw model output leaves the data's range, and normalised
    dims whose min/max lie beyond q01/q99: the postprocessor JSON gives what Policy.infer returns."""
    from selfflow_robot.policies import Policy

    ckpt = tiny_checkpoint(tmp_path / "ckpt", state_dim=0)
    path = Path(ckpt) / "normalization.json"
    norm = json.loads(path.read_text())
    norm["action"].update(min=[-1.5, -2.0, -4.0, -0.5], max=[1.5, 3.0, 9.0, 1.0])  # dim 3 (gripper): 0.5 .. 1.0
    path.write_text(json.dumps(norm))
    kw = {} if margin == 0.1 else {"data_margin": margin}  # 0.1: the default on both sides
    out = export_lerobot(ckpt, tmp_path / "lerobot", **kw)
    step = json.loads((out / "policy_postprocessor.json").read_text())["steps"][0]["config"]
    raw = np.array([[0.3, -2.0, 1.5, 2.0], [-0.9, 0.2, -1.1, -1.6], [1.0, 0.0, 0.0, 1.1], [0.0, 1.0, -1.0, 0.6]],
                   np.float32)
    policy = Policy(lambda obs: raw, {"action_dim": 4}, norm,
                    safety=None if margin == 0.1 else SafetyConfig(data_margin=margin))
    expected = policy.infer({"image": np.zeros((32, 32, 3), np.uint8)})["actions"]
    got = lf.postprocess_action(torch.from_numpy(raw), step).numpy()
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    if margin is not None:  # the bound binds on the gripper (raw 2.0 > 1.0 + margin * 1.5)
        assert expected[0, 3] == np.float32(1.0 + margin * 1.5) and expected[1, 3] == np.float32(-0.5 - margin * 1.5)
    else:
        assert step["low"] is None and expected[0, 3] == np.float32(2.0)


def test_export_options_and_refusals(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", state_dim=0)
    out = export_lerobot(ckpt, tmp_path / "a", camera="observation.images.front")
    cfg = json.loads((out / "config.json").read_text())
    assert list(cfg["input_features"]) == ["observation.images.front"]  # no state feature without state
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export_lerobot(ckpt, out)
    export_lerobot(ckpt, out, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        export_lerobot(ckpt, tmp_path / "file", overwrite=True)
    with pytest.raises(ValueError, match="n_action_steps=9: must be in 1..4"):
        export_lerobot(ckpt, tmp_path / "b", n_action_steps=9)
    with pytest.raises(ValueError, match="data_margin must be a number >= 0"):
        export_lerobot(ckpt, tmp_path / "e", data_margin=-0.1)
    with pytest.raises(ValueError, match="this policy sees one camera"):
        export_lerobot(ckpt, tmp_path / "c", camera="a,b")
    cfg_path = Path(ckpt) / "config.json"
    run_cfg = json.loads(cfg_path.read_text())
    run_cfg["model"]["text"] = run_cfg["io"]["text"] = "embedding"
    cfg_path.write_text(json.dumps(run_cfg))
    with pytest.raises(ValueError, match="instruction embedding"):
        export_lerobot(ckpt, tmp_path / "d")
    assert not (tmp_path / "d").exists() and not (tmp_path / "b").exists()


def test_parse_args_errors_name_the_option():
    assert parse_args(["run", "out=x", "sampler_steps=4"]) == ("run", {"out": "x", "camera": None, "device": "cpu",
                                                                      "sampler_steps": 4})
    for argv, message in ((["run"], "out is not set"), (["run", "out=x", "step=3"], "unknown option"),
                          (["out=x"], "expected one RUN"), (["run", "out=x", "sampler_steps=a"], "expected an integer"),
                          (["run", "out=x", "overwrite=maybe"], "expected true or false"),
                          (["run", "out=x", "data_margin=wide"], "expected a number >= 0 or null")):
        with pytest.raises(ValueError, match=message):
            parse_args(argv)
    assert parse_args(["run", "out=x", "data_margin=null"])[1]["data_margin"] is None
    assert parse_args(["run", "out=x", "data_margin=0.25"])[1]["data_margin"] == 0.25


def test_export_cli_is_one_line_on_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.export", "lerobot", str(tmp_path / "nope"),
                        f"out={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.export", "tflite"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "unknown export 'tflite'" in r.stderr


def test_plugin_against_lerobot(tmp_path):
    """The whole check needs LeRobot 0.6 (Python >= 3.12): scripts/test_lerobot_plugin.sh runs it."""
    pytest.importorskip("lerobot", reason="lerobot is not installed here (it needs Python >= 3.12 and torch < 2.12); "
                                          "scripts/test_lerobot_plugin.sh builds its venv and runs the plugin tests")
    import test_plugin  # integrations/lerobot/tests/test_plugin.py (its folder is on sys.path above)

    test_plugin.test_factory_loads_the_export_and_matches_policy_load(tmp_path)
