"""ONNX export + torch-free runner: the same chunks as Policy.load on the same observations and noise."""
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the ONNX export needs the onnx package (pip install onnx)")
pytest.importorskip("onnxruntime", reason="the ONNX runner needs onnxruntime (pip install onnxruntime)")
torch = pytest.importorskip("torch")

from selfflow_robot.policies.onnx_runner import load_onnx_policy, resize_frame  # noqa: E402

STEPS = 3
# max |difference| of un-normalised actions for the same observations and noise. Measured: <= 2.4e-7 with
# frames at the model's size; <= 6e-5 when the runner resizes (numpy vs torch resize differ by one grey
# level in < 1% of the pixels).
TOL = {(32, 48): 1e-5, (64, 90): 1e-3}


def _checkpoint(d, state_dim=3):
    from safetensors.torch import save_file

    from selfflow_robot.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", action_dim=4, state_dim=state_dim, patch_size=8)
    with torch.no_grad():  # zero-initialised output layers would make every chunk the same
        for p in model.parameters():
            if p.dim() and not p.abs().sum():
                p.normal_(std=0.05)
    io = {"action_dim": 4, "action_chunk": 5, "image_size": [32, 48], "context_frames": 2, "future_frames": 1,
          "frame_stride": 1, "state_dim": state_dim, "fps": 3, "text": "bytes"}
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model": model.cfg.to_dict(), "io": io}))
    (d / "normalization.json").write_text(json.dumps({
        "mode": "q99", "action": {"q01": [-1, -2, 0, 0], "q99": [1, 2, 3, 1], "mask": [True, True, True, False]},
        "state": {"q01": [0, 0, 0], "q99": [1, 2, 3]}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    return d


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from selfflow_robot.export_onnx import export_onnx

    tmp = tmp_path_factory.mktemp("onnx")
    ckpt = _checkpoint(tmp / "ckpt")
    manifest = export_onnx(str(ckpt), str(tmp / "out"), steps=STEPS)
    return ckpt, tmp / "out", manifest


def _observations(n, size=(32, 48)):
    rng = np.random.default_rng(1)
    return [{"image": rng.integers(0, 256, (*size, 3), dtype=np.uint8), "state": rng.uniform(0, 2, 3)}
            for _ in range(n)]


def test_manifest_describes_the_graph(exported):
    _, out, m = exported
    assert (out / "policy.onnx").is_file() and (out / "normalization.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["steps"] == STEPS
    assert [(s["name"], s["dtype"], s["shape"]) for s in m["inputs"]] == [
        ("frames", "uint8", [1, 2, 32, 48, 3]), ("noise", "float32", [1, 5, 4]), ("text", "int64", [1, 64]),
        ("state", "float32", [1, 3])]
    assert m["outputs"][0]["shape"] == [1, 5, 4] and m["normalization"]["action"]["mask"][3] is False
    assert m["check_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("camera", [(32, 48), (64, 90)])  # the model's size, and one the runner resizes
def test_runner_reproduces_policy_infer(exported, camera):
    from selfflow_robot.policies import Policy

    ckpt, out, _ = exported
    torch_policy = Policy.load(ckpt, sampler_steps=STEPS)  # its sampler draws noise from a generator seeded 0
    g = torch.Generator().manual_seed(0)
    onnx_policy = load_onnx_policy(out, noise=lambda shape: torch.randn(shape, generator=g).numpy())
    for p in (torch_policy, onnx_policy):
        p.reset("pick coke can")
    diffs = []
    for obs in _observations(3, camera):  # three steps: the context history fills as in torch
        want, got = torch_policy.infer(obs), onnx_policy.infer(obs)
        assert got["actions"].shape == (5, 4) and got["safety"] == want["safety"]
        diffs.append(np.abs(got["actions"] - want["actions"]).max())
    assert max(diffs) < TOL[camera], diffs
    assert np.ptp(want["actions"]) > 0.1  # not a degenerate model that would hide a mismatch


def test_numpy_resize_matches_torch():
    from selfflow_robot.sampling import resize_frame as torch_resize

    img = np.random.default_rng(0).integers(0, 256, (61, 97, 3), dtype=np.uint8)
    for size in ((32, 48), (20, 30), (80, 120)):
        diff = np.abs(resize_frame(img, size).astype(int) - torch_resize(img, size).numpy().astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (size, diff.max(), (diff == 0).mean())


def test_runner_imports_no_torch(exported):
    _, out, _ = exported
    code = ("import sys, numpy as np\n"
            "from selfflow_robot.policies.onnx_runner import load_onnx_policy\n"
            f"p = load_onnx_policy({str(out)!r}, seed=3)\n"
            "a = p.act({'image': np.zeros((32, 48, 3), np.uint8), 'state': np.zeros(3), 'instruction': 'x'})\n"
            "assert a.shape == (4,), a.shape\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_cli_errors_are_one_line(tmp_path, exported):
    ckpt, _, _ = exported
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.export", "onnx", str(ckpt)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "out is not set" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.export", "onnx", str(tmp_path / "nope"),
                        f"out={tmp_path}/x"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="format"):
        (tmp_path / "manifest.json").write_text("{}")
        load_onnx_policy(tmp_path)


def test_bench_times_the_runner_against_torch(exported):
    from selfflow_robot.policies.bench import bench_onnx

    ckpt, _, _ = exported
    r = bench_onnx(str(ckpt), {"image": np.zeros((32, 48, 3), np.uint8)}, iters=2, warmup=1, steps=STEPS)
    assert r["torch_eager"]["n"] == r["onnxruntime_runner"]["n"] == 2 and r["onnx_over_torch"] > 0
    assert r["steps"] == STEPS and r["model"] == "tiny"
