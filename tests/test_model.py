"""Backbone math: per-token conditioning, taps, truncated teacher forward, sizes."""
import copy
from unittest import mock

import pytest
import torch

from selfflow_robot.models import SIZES, TokenTimes, build_model


def randomized(model, seed=0):
    """DiT zero-init makes every adaLN path trivially equal; randomise all weights for the tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def inputs(model, B=2, T=2, h=3, w=4, H=5):
    g = torch.Generator().manual_seed(1)
    P = model.patch_dim
    return dict(video=torch.randn(B, T, h, w, P, generator=g), action=torch.randn(B, H, model.cfg.action_dim, generator=g),
                context=torch.randn(B, 1, h, w, P, generator=g), text=model.encode_text(["pick coke can", "open drawer"]))


@pytest.fixture(scope="module")
def model():
    return randomized(build_model("tiny", depth=3, action_dim=7, frame_stride=2))


def float64(model):
    """A float64 copy and its inputs. Paths that differ only in the shapes of their matmuls (slots
    shared or not, dense or gathered) agree to rounding there; in float32 that rounding, grown
    through the randomised blocks, reached 1.8e-4 on outputs of ~26 (CPU torch 2.4 and 2.13)."""
    model = copy.deepcopy(model).double()
    return model, {k: v.double() if v.is_floating_point() else v for k, v in inputs(model).items()}


def test_per_token_conditioning_equals_scalar_path(model):
    model, x = float64(model)
    t = torch.tensor([0.3, 0.8])
    scalar = model(**x, video_t=t, action_t=t, context_t=t * 0.1)
    per_token = model(**x, video_t=t[:, None, None, None].expand(2, 2, 3, 4), action_t=t[:, None].expand(2, 5),
                      context_t=(t * 0.1)[:, None, None, None].expand(2, 1, 3, 4))
    slots = model(**x, video_t=TokenTimes(torch.stack([t, t], 1), torch.randint(0, 2, (2, 2, 3, 4))),
                  action_t=t, context_t=t * 0.1)
    for out in (per_token, slots):
        torch.testing.assert_close(out["video"], scalar["video"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out["action"], scalar["action"], rtol=1e-10, atol=1e-10)


def test_distinct_timestep_slots_equal_dense_per_token(model):
    """Gathering modulation from K distinct values equals computing it for every token."""
    model, x = float64(model)
    values = torch.tensor([[0.2, 0.9], [0.5, 0.1]])
    idx = torch.randint(0, 2, (2, 2, 3, 4), generator=torch.Generator().manual_seed(3))
    dense = torch.gather(values, 1, idx.flatten(1)).view(2, 2, 3, 4)
    a = model(**x, video_t=TokenTimes(values, idx), action_t=values[:, 0])
    b = model(**x, video_t=dense, action_t=values[:, 0])
    torch.testing.assert_close(a["video"], b["video"], rtol=1e-10, atol=1e-10)
    # and the timesteps matter: swapping the slots changes the output
    c = model(**x, video_t=TokenTimes(values.flip(1), idx), action_t=values[:, 0])
    assert not torch.allclose(a["video"], c["video"], atol=1e-4)


def test_streams_given_one_timestep_tensor_share_slots(model):
    """Video and actions on the same levels embed them once (fewer slots, less modulation work).
    In float64 (see float64()), where a slot mix-up shows as a difference of ~4."""
    model, x = float64(model)
    values = torch.tensor([[0.2, 0.9], [0.5, 0.1]])
    vi = torch.randint(0, 2, (2, 2, 3, 4), generator=torch.Generator().manual_seed(3))
    ai = torch.randint(0, 2, (2, 5), generator=torch.Generator().manual_seed(4))
    slots = []
    hook = model.t_embedder.register_forward_hook(lambda m, args, out: slots.append(args[0].shape[1]))
    shared = model(**x, video_t=TokenTimes(values, vi), action_t=TokenTimes(values, ai))
    apart = model(**x, video_t=TokenTimes(values, vi), action_t=TokenTimes(values.clone(), ai))
    t = values[:, 0]
    model(**x, video_t=t, action_t=t)
    hook.remove()
    assert slots == [1 + 1 + 2, 1 + 1 + 2 + 2, 1 + 1 + 1]  # text, context, then the generated streams
    torch.testing.assert_close(shared["video"], apart["video"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(shared["action"], apart["action"], rtol=1e-10, atol=1e-10)


def test_taps_and_truncated_teacher_forward(model):
    x = inputs(model)
    t = torch.tensor([0.3, 0.8])
    full = model(**x, video_t=t, action_t=t, taps=(1, 2))
    n_gen = 2 * 3 * 4 + 5
    assert full["features"][1].shape == (2, n_gen, model.cfg.width)
    trunc = model(**x, video_t=t, action_t=t, taps=(2,), stop_after=2)
    assert "video" not in trunc and "action" not in trunc
    torch.testing.assert_close(trunc["features"][2], full["features"][2])


def test_resolution_and_frame_count_can_change(model):
    for T, h, w in [(1, 2, 2), (4, 5, 6)]:
        out = model(video=torch.randn(1, T, h, w, model.patch_dim), video_t=torch.tensor([0.5]))
        assert out["video"].shape == (1, T, h, w, model.patch_dim)


def test_frames_tokens_round_trip(model):
    frames = torch.randint(0, 256, (2, 3, 16, 24, 3), dtype=torch.uint8)
    tok = model.frames_to_tokens(frames)
    assert tok.shape == (2, 3, 2, 3, model.patch_dim)
    assert torch.equal(model.tokens_to_frames(tok), frames)
    with pytest.raises(ValueError, match="patch_size"):
        model.frames_to_tokens(torch.zeros(1, 1, 15, 24, 3, dtype=torch.uint8))


def test_xl_parameter_count():
    with torch.device("meta"):
        n = build_model("xl").backbone_parameters()
    assert 665e6 <= n <= 685e6, n
    assert SIZES["xl"] == dict(depth=28, width=1152, heads=16)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="heads"):
        build_model("tiny", width=66, heads=4)
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("huge")


def test_init_mismatch_names_the_differing_setting(tmp_path):
    """A patch size (or autoencoder) change keeps name/depth/width: the message names the setting."""
    from selfflow_robot.models.loading import load_backbone
    from selfflow_robot.train.checkpoint import save_tensors, write_json

    pretrained = build_model("tiny", patch_size=16)
    save_tensors(pretrained.state_dict(), tmp_path / "model.safetensors")
    write_json(tmp_path / "config.json", {"model": pretrained.cfg.to_dict()})
    with pytest.raises(ValueError) as err:
        load_backbone(build_model("tiny", patch_size=8, action_dim=7), tmp_path)  # fine-tuning adds actions
    header = str(err.value).splitlines()[0]
    assert header.endswith("settings that differ (checkpoint vs this run): patch_size 16 vs 8):"), header
    (tmp_path / "config.json").unlink()  # weights alone: the mismatched tensors still name the cause
    with pytest.raises(ValueError, match=r"(?s)this run is tiny \(depth 2, width 64\)\):\n  \S+: checkpoint \("):
        load_backbone(build_model("tiny", patch_size=8), tmp_path)


def test_init_from_a_latent_model_without_its_autoencoder_says_which_setting(tmp_path):
    from selfflow_robot.models.loading import load_backbone
    from selfflow_robot.train.checkpoint import save_tensors

    latent = build_model("tiny", autoencoder={"channels": 4, "width": 8, "downsample": 4}, patch_size=2)
    save_tensors(latent.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="trained on a frozen autoencoder's latents: add model.autoencoder=DIR"):
        load_backbone(build_model("tiny", patch_size=2), tmp_path)


def test_init_from_a_fine_tuned_run_says_its_action_layers_are_left_out(tmp_path):
    from selfflow_robot.models.loading import load_backbone
    from selfflow_robot.train.checkpoint import save_tensors, write_json

    tuned = build_model("tiny", action_dim=7)
    save_tensors(tuned.state_dict(), tmp_path / "model.safetensors")
    write_json(tmp_path / "config.json", {"model": tuned.cfg.to_dict()})
    with pytest.warns(UserWarning, match=r"this model has no action_embed, action_head; the checkpoint's are left out"):
        load_backbone(build_model("tiny"), tmp_path)  # pretraining: no action stream


def test_prefix_cache_equals_full_forward(model):
    """Conditioning never attends to generated tokens, so its keys/values can be cached."""
    x = inputs(model)
    t = torch.tensor([0.3, 0.8])
    full = model(**x, video_t=t, action_t=t, context_t=t * 0.1)
    prefix = model.encode_prefix(context=x["context"], context_t=t * 0.1, text=x["text"])
    cached = model(video=x["video"], video_t=t, action=x["action"], action_t=t, prefix=prefix)
    torch.testing.assert_close(cached["video"], full["video"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached["action"], full["action"], rtol=1e-4, atol=1e-4)
    # the conditioning's features do not depend on the noisy tokens
    other = model(**{**x, "video": torch.randn_like(x["video"])}, video_t=t, action_t=t, context_t=t * 0.1,
                  taps=(1,))
    assert not torch.allclose(other["video"], full["video"])
    with pytest.raises(ValueError, match="prefix"):
        model(**x, video_t=t, action_t=t, prefix=prefix)


def test_precomputed_modulation_equals_time_embedding(model):
    """Sampling computes every step's adaLN output up front; each step must match the plain path
    (in float64, so that batched and single-row matmuls agree to rounding)."""
    model = copy.deepcopy(model).double()
    x = {k: v.double() if v.is_floating_point() else v for k, v in inputs(model).items()}
    prefix = model.encode_prefix(context=x["context"], context_t=torch.zeros(2), text=x["text"])
    ts = torch.tensor([1.0, 0.55, 0.1], dtype=torch.float64)
    schedule = model.modulation_schedule(ts, batch=2)
    assert len(schedule) == 3 and len(schedule[0].blocks) == len(model.blocks)
    for t, mod in zip(ts, schedule):
        tb = t.expand(2)
        plain = model(video=x["video"], video_t=tb, action=x["action"], action_t=tb, prefix=prefix)
        fast = model(video=x["video"], video_t=tb, action=x["action"], action_t=tb, prefix=prefix, modulation=mod)
        torch.testing.assert_close(fast["video"], plain["video"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fast["action"], plain["action"], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="prefix"):
        model(**x, video_t=ts[:2], action_t=ts[:2], modulation=schedule[0])


def test_full_attention_option():
    m = randomized(build_model("tiny", depth=2, action_dim=3, isolate_condition=False))
    x = inputs(m)
    with pytest.raises(ValueError, match="isolate_condition"):
        m.encode_prefix(context=x["context"], text=x["text"])
    assert m(**x, video_t=torch.tensor([0.5, 0.5]), action_t=torch.tensor([0.5, 0.5]))["video"].shape == x["video"].shape


def test_x_prediction_returns_the_implied_velocity(model):
    """video_prediction=x: the head's output is x0_hat and forward returns (x_t - x0_hat) / max(t, 0.05)
    per token, so objectives and samplers keep working in velocities."""
    x = inputs(model)
    x_model = copy.deepcopy(model)
    x_model.cfg.video_prediction = "x"
    values = torch.tensor([[0.02, 0.9], [0.5, 0.3]])  # 0.02 is clipped to 0.05
    idx = torch.randint(0, 2, (2, 2, 3, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(video_t=TokenTimes(values, idx), action_t=values[:, 1], context_t=values[:, 1] * 0)
    raw = model(**x, **kw)  # same weights, head output read as a velocity
    out = x_model(**x, **kw)
    tau = torch.gather(values, 1, idx.flatten(1)).view(2, 2, 3, 4, 1).clamp_min(0.05)
    torch.testing.assert_close(out["video"], (x["video"] - raw["video"]) / tau)
    torch.testing.assert_close(out["action"], raw["action"])  # actions stay velocity-predicted
    # a perfect x0 prediction gives the exact flow-matching target eps - x0
    x0, eps, t = torch.randn(4, 1, 2, 2, 6), torch.randn(4, 1, 2, 2, 6), torch.tensor([0.1, 0.4, 0.7, 1.0])
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    torch.testing.assert_close(x_model._velocity_from_x(xt, x0, t), eps - x0)
    with pytest.raises(ValueError, match="video_prediction"):
        build_model("tiny", video_prediction="eps")


def test_compiled_model_does_not_recompile_for_new_timestep_tensors(model):
    """Each observation and denoising step brings new timestep tensors. The slot sharing must
    compare them by identity within a call: id() in traced code guards on the tensor object, so
    every call recompiled (XL policy on an H100: p90 3.4 s per chunk instead of 45 ms)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    x = inputs(model)
    prefix_count, forward_count = CompileCounter(), CompileCounter()
    encode_prefix = torch.compile(model.encode_prefix, backend=prefix_count, dynamic=False)
    forward = torch.compile(model, backend=forward_count, dynamic=False)
    for step in range(3):
        prefix = encode_prefix(context=x["context"], context_t=torch.zeros(2), text=x["text"])
        t = torch.full((2,), 0.9 - 0.3 * step)
        out = forward(video=x["video"], video_t=t, action=x["action"], action_t=t, prefix=prefix)
        expected = model(video=x["video"], video_t=t, action=x["action"], action_t=t, prefix=prefix)
        torch.testing.assert_close(out["action"], expected["action"])
    assert (prefix_count.frame_count, forward_count.frame_count) == (1, 1)


def test_per_block_compile_covers_every_path_a_run_takes(monkeypatch, caplog):
    """The trainer compiles each block; all blocks share one compiled-code cache, filled by every
    variant a fine-tuning run meets (student with grad, no-grad teacher and validation, a last
    partial batch, prefix encoding and sampling at evaluation). With dynamo's default limit of 8
    entries the later ones ran eagerly, with only a log warning."""
    from torch._dynamo.testing import CompileCounter

    from selfflow_robot.sampling import euler_sample
    from selfflow_robot.train.distributed import DistInfo, parallelize

    torch._dynamo.reset()
    counter, real_compile = CompileCounter(), torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend=counter))
    # Dynamo's config is no plain module: patch it with its own patch(), which restores the value.
    # pytest >= 9.2's monkeypatch deletes what it finds outside __dict__, and a deleted dynamo
    # setting breaks every later compile in the session ("recompile_limit does not exist").
    config = torch._dynamo.config
    before = config.recompile_limit
    with config.patch(recompile_limit=8):  # the default; parallelize raises it
        student = build_model("tiny", depth=2, action_dim=3)
        ema = copy.deepcopy(student).requires_grad_(False)
        parallelize(student, ema, "none", DistInfo(), compile=True, param_dtype=None)
        caplog.set_level("WARNING", logger="torch._dynamo")
        for B in (4, 3, 1):  # training batches, then the validation set's last partial batch
            x = inputs(student, B=B, T=1)
            x["text"] = x["text"][:1].expand(B, -1)
            t = torch.rand(B)
            student(**x, video_t=t, action_t=t, taps=(1,))["video"].sum().backward()
            with torch.no_grad():
                ema(**x, video_t=t, action_t=t, taps=(1,), stop_after=1)
                student(**x, video_t=t, action_t=t)
        for model in (student, ema):  # evaluation samples with either
            x = inputs(model, B=1, T=1)
            euler_sample(model, steps=2, context=x["context"], text=x["text"][:1], video_shape=x["video"].shape,
                         action_shape=x["action"].shape)
    assert config.recompile_limit == before  # restored for the tests that follow
    assert counter.frame_count > 8  # the run above needs more than dynamo's default limit
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_gather_copies_rows_exactly_both_ways(dtype):
    """Eager one-hot matmul and the compiled masked sum both pick each token's slot row exactly,
    and send each token's gradient back to its slot."""
    from selfflow_robot.models import layers

    torch.manual_seed(0)
    B, N, K, C = 2, 11, 3, 8
    index = torch.randint(0, K, (B, N))
    select = torch.nn.functional.one_hot(index, K).to(dtype)
    per_slot = torch.randn(B, K, C, dtype=dtype, requires_grad=True)
    want = torch.gather(per_slot, 1, index[..., None].expand(-1, -1, C))
    grad = torch.randn(B, N, C, dtype=dtype)
    (want_grad,) = torch.autograd.grad(want, per_slot, grad)
    for compiling in (False, True):
        with mock.patch.object(torch.compiler, "is_compiling", lambda: compiling):
            got = layers.gather_tokens(per_slot, select)
        assert torch.equal(got, want)
        (got_grad,) = torch.autograd.grad(got, per_slot, grad)
        torch.testing.assert_close(got_grad, want_grad)
