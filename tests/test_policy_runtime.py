"""Policy with a fake predictor: infer/act pipeline, checkpoint loading and its errors."""
import json
import sys
import types

import numpy as np
import pytest

from selfflow_robot.policies import ChunkConfig, Policy, SafetyConfig
from selfflow_robot.policies.policy import ObservationError

NORM = {"mode": "q99", "action": {"q01": [-1.0, 0.0, 0.0], "q99": [1.0, 2.0, 1.0], "mask": [True, True, False]},
        "state": {"q01": [0.0, 0.0], "q99": [4.0, 4.0]}}
IMG = np.zeros((8, 10, 3), np.uint8)
STATE = np.array([2.0, 2.0], np.float32)  # make()'s policy takes a 2-d state


class Fake:
    """predict_fn returning a chunk whose first column counts calls; records what it saw."""

    def __init__(self, h=4):
        self.calls, self.h, self.seen = 0, h, []

    def __call__(self, obs):
        self.seen.append(obs)
        x = np.zeros((self.h, 3), np.float32)
        x[:, 0] = np.linspace(-1, 1, self.h) * 0.5
        x[:, 1] = self.calls * 0.1
        x[:, 2] = 0.5
        self.calls += 1
        return {"actions": x, "video": np.zeros((2, 4, 4, 3), np.uint8)}


def make(fake=None, chunk=None, safety=None, norm=NORM):
    return Policy(fake or Fake(), {"action_dim": 3, "state_dim": 2}, norm, chunk, safety)


def test_infer_unnormalises_and_reports():
    p = make()
    r = p.infer({"image": IMG, "instruction": "pick", "state": STATE})
    a = r["actions"]
    assert a.dtype == np.float32 and a.shape == (4, 3)
    np.testing.assert_allclose(a[:, 0], np.linspace(-1, 1, 4) * 0.5, atol=1e-6)  # q01=-1, q99=1: identity
    np.testing.assert_allclose(a[:, 1], 1.0)  # 0.5 * (0 + 1) * 2 + 0
    np.testing.assert_allclose(a[:, 2], 0.5)  # gripper passes through
    assert r["server_timing"]["infer_ms"] >= 0 and r["safety"]["hold"] is False
    assert r["video"].shape == (2, 4, 4, 3)


def test_instruction_and_state_normalisation_reach_predictor():
    fake = Fake()
    p = make(fake)
    p.reset("open drawer")
    p.infer({"image": IMG, "state": np.array([2.0, 4.0], np.float32)})
    assert fake.seen[-1]["instruction"] == "open drawer"
    np.testing.assert_allclose(fake.seen[-1]["state"], [0.0, 1.0])
    p.infer({"image": IMG, "instruction": "close drawer", "state": STATE})
    assert fake.seen[-1]["instruction"] == "close drawer"


def test_normalised_clip_before_unnormalising():
    # data_margin=None: no bound from the data's range, so the pass-through gripper keeps its 9.0
    p = make(lambda o: np.array([[3.0, -7.0, 9.0]], np.float32), safety=SafetyConfig(data_margin=None))
    r = p.infer({"image": IMG, "state": STATE})
    np.testing.assert_allclose(r["actions"], [[1.0, 0.0, 9.0]])
    assert r["safety"]["clipped"]


def test_inf_is_held_not_clipped():
    p = make(lambda o: np.array([[np.inf, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32),
             safety=SafetyConfig(hold="zeros"))
    r = p.infer({"image": IMG, "state": STATE})
    np.testing.assert_array_equal(r["actions"], np.zeros((2, 3)))
    assert r["safety"]["hold"]


def test_act_pops_chunk_and_limits_steps():
    fake = Fake(h=2)
    p = make(fake, safety=SafetyConfig(max_delta=[0.3, 10.0, 10.0]))
    acts = [p.act({"image": IMG, "state": STATE}) for _ in range(4)]
    assert fake.calls == 2
    # chunk column 0 = [-0.5, 0.5]; step 1 is limited to -0.5 + 0.3; step 2 (new chunk) from -0.2 -> -0.5
    np.testing.assert_allclose([a[0] for a in acts], [-0.5, -0.2, -0.5, -0.2], atol=1e-6)
    assert p.last_safety == {"hold": False, "clipped": False, "delta_limited": False}  # chunk was pre-limited
    np.testing.assert_allclose([a[1] for a in acts], [1.0, 1.0, 1.1, 1.1], atol=1e-6)  # 0.5 (0.1 c + 1) 2
    p.reset()
    p.act({"image": IMG, "state": STATE})
    assert fake.calls == 3


def test_act_with_ensembling_queries_every_step():
    fake = Fake(h=3)
    p = make(fake, chunk=ChunkConfig(ensemble=True, ensemble_k=0.0))
    a = [p.act({"image": IMG, "state": STATE})[1] for _ in range(3)]
    # column 1 of chunk c is 1 + 0.1 c (un-normalised); equal weights over covering chunks
    np.testing.assert_allclose(a, [1.0, (1.0 + 1.1) / 2, (1.0 + 1.1 + 1.2) / 3], atol=1e-6)
    assert fake.calls == 3


@pytest.mark.parametrize("obs, msg", [
    ({"image": IMG.astype(np.float32)}, "uint8"),
    ({"image": IMG[..., 0]}, r"\[H, W, 3\]"),
    ({"image": np.zeros((8, 10, 4), np.uint8)}, r"\[H, W, 3\]"),
    ({"image": np.zeros((0, 10, 3), np.uint8)}, r"\[H, W, 3\]"),
    ({"instruction": "x"}, "lacks 'image'"),
    ({"image": IMG, "instruction": 3}, "instruction"),
    ({"image": IMG, "state": np.zeros(5, np.float32)}, "expects 2"),
    ({"image": IMG, "state": np.array([np.nan, 0.0])}, "NaN"),
    ({"image": IMG}, r"needs obs\['state'\] \(float\[2\]\)"),
    ([IMG], "dict"),
])
def test_observation_validation(obs, msg):
    with pytest.raises(ObservationError, match=msg):
        make().infer(obs)


def test_predictor_shape_mismatch():
    with pytest.raises(RuntimeError, match=r"expected \[H, 3\]"):
        make(lambda o: np.zeros((4, 2), np.float32)).infer({"image": IMG, "state": STATE})
    with pytest.raises(ValueError, match="action dims"):
        Policy(Fake(), {"action_dim": 2}, NORM, None, None)


# ---- checkpoint loading ----

def _write_ckpt(d, model=None, io=None, files=("config.json", "model.safetensors", "normalization.json")):
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"model": model if model is not None else {"name": "tiny", "action_dim": 3},
           "io": io if io is not None else {"action_dim": 3, "action_chunk": 4, "image_size": [8, 10], "fps": 3,
                                            "context_frames": 1, "future_frames": 1, "state_dim": None}}
    if "config.json" in files:
        (d / "config.json").write_text(json.dumps(cfg))
    if "model.safetensors" in files:
        from safetensors.numpy import save_file
        save_file({"w": np.zeros(2, np.float32)}, str(d / "model.safetensors"))
    if "normalization.json" in files:
        (d / "normalization.json").write_text(json.dumps(NORM))
    return d


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "normalization.json"])
def test_load_names_missing_file(tmp_path, missing):
    files = {"config.json", "model.safetensors", "normalization.json"} - {missing}
    ckpt = _write_ckpt(tmp_path / "step_1", files=files)
    with pytest.raises(FileNotFoundError, match=missing):
        Policy.load(ckpt)


def test_load_refuses_pretraining_checkpoint(tmp_path):
    ckpt = _write_ckpt(tmp_path / "c", model={"name": "tiny", "action_dim": 0}, io={})
    with pytest.raises(ValueError, match=r"config.json.*no action head"):
        Policy.load(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"trainer": {}}))
    with pytest.raises(ValueError, match=r"config.json.*no 'model' section"):
        Policy.load(ckpt)


def test_a_pretraining_run_is_told_to_fine_tune_first(tmp_path):
    """Pretraining writes no normalization.json: say what the checkpoint is, not which file it lacks."""
    from selfflow_robot.policies.policy import resolve_checkpoint

    ckpt = _write_ckpt(tmp_path / "pre", model={"name": "tiny", "action_dim": 0}, io={},
                       files=("config.json", "model.safetensors"))
    with pytest.raises(ValueError, match=r"is a pretraining checkpoint .*fine-tune it first.*finetune init="):
        Policy.load(ckpt)
    full = _write_ckpt(tmp_path / "ft")
    assert resolve_checkpoint(full / "model.safetensors") == full  # a file of the checkpoint names its folder


def test_load_bad_latest_and_unknown_option(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_9\n")
    with pytest.raises(FileNotFoundError, match="step_9"):
        Policy.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Policy.load(tmp_path / "nope")
    _write_ckpt(tmp_path / "checkpoints" / "step_9")
    with pytest.raises(TypeError, match="bogus"):
        Policy.load(tmp_path, bogus=1)


def test_load_run_dir_with_fake_model_code(tmp_path, monkeypatch):
    """Policy.load wiring (run dir -> latest, metadata, overrides, sampler call) with stand-ins
    for the model engineer's load_checkpoint_model / ActionSampler."""
    ckpt = _write_ckpt(tmp_path / "run" / "checkpoints" / "step_00000010")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000010\n")
    calls = {}

    class Model:
        def to(self, dtype):
            calls["dtype"] = dtype
            return self

    def load_checkpoint_model(path, device):
        calls["load"] = (path, device)
        return MODEL, {"model": {"action_dim": 3}}

    class ActionSampler:
        def __init__(self, model, cfg, device, steps=10, mode="action_first", compile=False):
            calls["sampler"] = (model, device, steps, mode, compile)

        def __call__(self, image, instruction, state=None, instruction_embedding=None):
            calls["call"] = (image.shape, instruction, None if instruction_embedding is None else len(instruction_embedding))
            return {"actions": np.zeros((4, 3), np.float32), "video": None}

        def reset(self):
            calls["reset"] = calls.get("reset", 0) + 1

    MODEL = Model()
    import selfflow_robot.models as models
    monkeypatch.setattr(models, "load_checkpoint_model", load_checkpoint_model, raising=False)
    monkeypatch.setitem(sys.modules, "selfflow_robot.sampling", types.SimpleNamespace(ActionSampler=ActionSampler))
    p = Policy.load(tmp_path / "run", device="cpu", sampler_steps=5, mode="joint", execute_steps=2, max_delta=0.5)
    assert calls["load"] == (str(ckpt), "cpu") and calls["sampler"] == (MODEL, "cpu", 5, "joint", False)
    assert str(calls["dtype"]) == "torch.float32" and p.metadata["dtype"] == "float32"  # auto on CPU
    assert p.metadata["action_dim"] == 3 and p.metadata["action_chunk"] == 4 and p.metadata["fps"] == 3
    assert p.metadata["normalization"] == "q99" and p.chunk_cfg.execute_steps == 2
    assert p.safety_cfg.max_delta == 0.5
    r = p.infer({"image": IMG, "instruction": "go"})
    assert calls["call"] == ((8, 10, 3), "go", None) and "video" not in r
    p.infer({"image": IMG, "instruction_embedding": np.zeros(512, np.float32)})
    assert calls["call"] == ((8, 10, 3), "", 512)
    resets = calls["reset"]
    p.reset("new task")
    assert calls["reset"] == resets + 1  # the sampler's frame history is cleared with the episode
    np.testing.assert_allclose(r["actions"][:, 1], 1.0)
    # the run's checkpoints/ dir names the same checkpoint, as for the trainer and evaluate's check
    from selfflow_robot.policies.policy import resolve_checkpoint
    from selfflow_robot.train.checkpoint import latest_checkpoint

    assert resolve_checkpoint(tmp_path / "run" / "checkpoints") == ckpt == latest_checkpoint(tmp_path / "run" / "checkpoints")
    pointer = tmp_path / "run" / "checkpoints" / "latest"  # the pointer file itself, as docs name it
    assert resolve_checkpoint(pointer) == ckpt == latest_checkpoint(pointer)


def test_load_real_model_if_available(tmp_path):
    """End-to-end with the model engineer's code once it exists (tiny random model, CPU)."""
    try:
        from selfflow_robot.models import build_model, load_checkpoint_model  # noqa: F401
        from selfflow_robot.sampling import ActionSampler  # noqa: F401
    except ImportError as e:
        pytest.skip(f"selfflow_robot.sampling.ActionSampler / models.load_checkpoint_model not available yet ({e})")
    from safetensors.torch import save_file

    model = build_model("tiny", action_dim=3)
    io = {"action_dim": 3, "action_chunk": 4, "image_size": [32, 32], "context_frames": 2, "future_frames": 1,
          "frame_stride": 1, "state_dim": None, "fps": 3, "text": "bytes"}
    ckpt = _write_ckpt(tmp_path / "ckpt", model=model.cfg.to_dict(), io=io)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    p = Policy.load(ckpt, sampler_steps=2)
    assert p.metadata["action_chunk"] == 4 and p.metadata["image_size"] == [32, 32]
    r = p.infer({"image": np.zeros((48, 64, 3), np.uint8), "instruction": "pick coke can"})
    assert r["actions"].dtype == np.float32 and r["actions"].shape == (4, 3) and np.all(np.isfinite(r["actions"]))
    assert p.act({"image": np.zeros((32, 32, 3), np.uint8)}).shape == (3,)
    # torch.compile (CUDA graphs on a GPU) and bfloat16 weights: the same policy, same noise
    obs = {"image": np.full((32, 32, 3), 90, np.uint8), "instruction": "pick coke can"}
    eager = Policy.load(ckpt, sampler_steps=2).infer(obs)["actions"]
    compiled = Policy.load(ckpt, sampler_steps=2, compile=True)
    assert compiled.metadata["compiled"] is True
    np.testing.assert_allclose(compiled.infer(obs)["actions"], eager, rtol=1e-4, atol=1e-4)
    half = Policy.load(ckpt, sampler_steps=2, dtype="bfloat16")
    np.testing.assert_allclose(half.infer(obs)["actions"], eager, atol=0.1)
    with pytest.raises(ValueError, match="dtype"):
        Policy.load(ckpt, dtype="fp8")


def test_matches_training_side_normaliser():
    """The runtime inverse undoes selfflow_robot.data's normaliser on masked dims, from its own file."""
    try:
        from selfflow_robot.data.normalize import ActionNormalizer
    except ImportError as e:
        pytest.skip(f"selfflow_robot.data.normalize not available ({e})")
    from selfflow_robot.policies.normalize import Normalizer

    stats = {"action": {"mean": [0.1, -0.2, 0.5], "std": [0.3, 0.2, 0.5], "min": [-1, -1, 0], "max": [1, 1, 1],
                        "q01": [-0.8, -0.5, 0.0], "q99": [0.9, 0.4, 1.0], "count": 10}}
    a = np.array([[0.2, -0.1, 1.0], [-0.7, 0.3, 0.0]], np.float32)
    for mode in ("q99", "mean_std"):
        train = ActionNormalizer(stats, mode, mask=[True, True, False])
        run = Normalizer(json.loads(json.dumps(train.to_dict())))
        np.testing.assert_allclose(run.unnormalize_action(train.normalize(a)), a, atol=1e-5)
        np.testing.assert_allclose(run.unnormalize_action(train.normalize(a)), train.unnormalize(train.normalize(a)),
                                   atol=1e-6)


def test_policy_without_state_input_ignores_state():
    from selfflow_robot.policies.policy import validate_obs

    obs = {"image": np.zeros((8, 8, 3), np.uint8), "instruction": "x", "state": np.zeros(4, np.float32)}
    assert "state" not in validate_obs(obs, 0)
    assert validate_obs(obs, 4)["state"].shape == (4,)


def test_example_observation_is_what_the_policy_takes():
    p = Policy(Fake(), {"action_dim": 3, "state_dim": 2, "image_size": [8, 10], "instruction_embedding_dim": 4},
               NORM, None, None)
    obs = p.example_observation()
    assert obs["image"].shape == (8, 10, 3) and obs["state"].shape == (2,)
    assert obs["instruction_embedding"].shape == (4,)
    assert p.infer(obs)["actions"].shape == (4, 3)
    with pytest.raises(ObservationError, match=r"conditions on obs\['instruction_embedding'\] \(float\[4\]\), got none"):
        p.infer({"image": IMG, "state": STATE})
    assert set(make().example_observation(image=IMG)) == {"image", "instruction", "state"}


def test_a_stretched_camera_frame_is_reported_once_per_size(caplog):
    """Any size is resized to the trained one; a different aspect ratio (a camera or crop mismatch
    on the client) is logged once per frame size, not per request."""
    import logging

    p = Policy(Fake(), {"action_dim": 3, "state_dim": 2, "image_size": [8, 10]}, NORM)
    obs = {"instruction": "pick", "state": STATE}
    with caplog.at_level(logging.WARNING, logger="selfflow_robot.policies"):
        for image in (IMG, np.zeros((16, 20, 3), np.uint8)):  # the trained aspect, any size
            p.infer({**obs, "image": image})
        assert "aspect ratio" not in caplog.text
        for _ in range(3):
            p.infer({**obs, "image": np.zeros((48, 20, 3), np.uint8)})
    assert caplog.text.count("observation image 48x20 has another aspect ratio than the 8x10 training") == 1


def test_the_aspect_check_compares_with_the_training_data_not_the_squashed_training_size(caplog):
    """Trained squashed (RT-1's 4:5 frames at 8x8): a camera frame framed like the data is right."""
    import logging

    p = Policy(Fake(), {"action_dim": 3, "state_dim": 2, "image_size": [8, 8], "data_image_size": [128, 160]}, NORM)
    with caplog.at_level(logging.WARNING, logger="selfflow_robot.policies"):
        p.infer({"instruction": "pick", "state": STATE, "image": np.zeros((256, 320, 3), np.uint8)})
        assert "aspect ratio" not in caplog.text
        p.infer({"instruction": "pick", "state": STATE, "image": np.zeros((64, 64, 3), np.uint8)})
    assert "than the 128x160 training frames" in caplog.text


def test_extra_cameras_may_go_by_their_short_names():
    """'wrist' for LeRobot's observation.images.wrist, and 'wrist_image' for RLDS's
    steps/observation/wrist_image (RLDS paths were refused: only '.' separators were matched)."""
    from selfflow_robot.policies.policy import validate_obs

    img = np.zeros((8, 10, 3), np.uint8)
    for views, short in ((["observation.images.top", "observation.images.wrist"], "wrist"),
                         (["steps/observation/image", "steps/observation/wrist_image"], "wrist_image")):
        for key in (short, views[1]):
            assert list(validate_obs({"image": img, "images": {key: img}}, views=views)["images"]) == [views[1]]
    with pytest.raises(ObservationError, match="lacks camera 'steps/observation/wrist_image'"):
        validate_obs({"image": img, "images": {"wrist": img}}, views=["steps/observation/image",
                                                                     "steps/observation/wrist_image"])


def _set(path, value):
    def edit(ckpt):
        cfg = json.loads((ckpt / "config.json").read_text())
        cur = cfg
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("damage, match", [
    (_set(["model", "depth"], "two"), r"config.json: model.depth: expected int, got 'two'"),
    (_set(["model", "qk_norm"], "yes"), r"config.json: model.qk_norm: expected bool"),
    (_set(["io", "action_chunk"], "four"), r"config.json: io.action_chunk must be an integer, got 'four'"),
    (_set(["io", "image_size"], 32), r"config.json: io.image_size must be \[height, width\]"),
    (lambda c: (c / "config.json").write_bytes(b"\xff\xfe\x00garbage"), r"config.json: not valid JSON"),
    (lambda c: (c / "normalization.json").write_bytes(b"\xff\xfe\x00garbage"), r"normalization.json: not valid JSON"),
    (lambda c: (c / "normalization.json").write_text('{"action": {"q01": "a", "q99": [1, 1, 1]}}'),
     r"normalization.json: normalization 'action.q01' must be a list of numbers"),
])
def test_a_damaged_checkpoint_file_is_named_with_its_key(tmp_path, damage, match):
    """Wrong types and garbage bytes are one ValueError naming the file and key (serve and evaluate
    print it as one line), never a TypeError from deep in the model code."""
    from safetensors.torch import save_file

    from selfflow_robot.models import build_model, load_checkpoint_model

    model = build_model("tiny", action_dim=3)
    io = {"action_dim": 3, "action_chunk": 4, "image_size": [32, 32], "context_frames": 1, "future_frames": 1,
          "frame_stride": 1, "state_dim": None, "fps": 3, "text": "bytes"}
    ckpt = _write_ckpt(tmp_path / "ckpt", model=model.cfg.to_dict(), io=io)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    damage(ckpt)
    with pytest.raises(ValueError, match=match):
        Policy.load(ckpt, sampler_steps=1)
    if "model" in match or "config.json: not" in match:  # the trainer-side loader too
        with pytest.raises(ValueError, match=match):
            load_checkpoint_model(ckpt)
