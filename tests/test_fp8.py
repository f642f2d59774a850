"""FP8 teacher matmuls: close to full precision, same parameters and keys, refreshed after EMA updates."""
import copy

import pytest
import torch
import torch.nn.functional as F

from selfflow_robot.models import build_model
from selfflow_robot.models import fp8 as fp8_mod
from selfflow_robot.models.fp8 import Fp8Linear, cpu_has_scaled_mm, fp8_matmuls, quantize_rows, use_fp8_teacher
from selfflow_robot.objectives import build_objective
from selfflow_robot.train.ema import ema_update

from test_objectives import make_batch

# These run the FP8 matmul on CPU: torch 2.7 has no CPU kernel for it, 2.10's takes no row-wise scales.
cpu_fp8 = pytest.mark.skipif(not cpu_has_scaled_mm(), reason=f"torch {torch.__version__}: no row-wise CPU _scaled_mm")


def test_quantize_rows_error_is_e4m3_sized():
    x = torch.randn(64, 128) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different size
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = q.float() * scale
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 for normal values.
    rel = ((back - x).abs() / x.abs().amax(dim=1, keepdim=True)).amax()
    assert rel < 2**-4 and (q.float().abs().amax(dim=1) == 448).all()


@cpu_fp8
def test_fp8_linear_shares_parameters_and_is_close():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    f8 = Fp8Linear.from_linear(lin)
    assert f8.weight is lin.weight and f8.bias is lin.bias
    x = torch.randn(3, 10, 64)
    assert torch.equal(f8(x), lin(x))  # off: the plain Linear
    with fp8_matmuls(f8):
        y = f8(x)
    ref = lin(x)
    assert y.shape == ref.shape
    assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.999
    assert not f8.fp8  # switched off again


def _model(depth=4):
    torch.manual_seed(0)
    model = build_model("tiny", depth=depth, action_dim=7, frame_stride=2, patch_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _teacher_features(ema, batch, k):
    x = ema.frames_to_tokens(batch["future"])
    t = torch.full((x.shape[0],), 0.3)
    return ema(video=x, video_t=t, text=ema.encode_text(batch["instruction"], x.device), taps=(k,), stop_after=k)["features"][k]


@cpu_fp8
def test_fp8_teacher_keeps_keys_and_matches_full_precision():
    model = _model()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    keys, params = list(ema.state_dict()), [id(p) for p in ema.parameters()]
    k = model.cfg.k_teacher
    assert use_fp8_teacher(ema, k) == 4 * k
    assert list(ema.state_dict()) == keys and [id(p) for p in ema.parameters()] == params
    batch = make_batch()
    ref = _teacher_features(model, batch, k)
    assert torch.equal(_teacher_features(ema, batch, k), ref)  # outside the context: unchanged
    with torch.no_grad(), fp8_matmuls(ema):
        fp8 = _teacher_features(ema, batch, k)
    cos = F.cosine_similarity(fp8, ref, dim=-1)
    assert cos.min() > 0.99 and not torch.equal(fp8, ref)


@cpu_fp8
def test_fp8_weights_follow_the_ema_update():
    model = _model()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    use_fp8_teacher(ema, model.cfg.k_teacher)
    lin = ema.blocks[0].mlp.fc1
    with fp8_matmuls(ema):
        before = lin.weight_fp8.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema_update(ema, model, decay=0.5)
    with fp8_matmuls(ema):  # requantised from the new EMA weights
        q, scale = quantize_rows(lin.weight)
        assert torch.equal(lin.weight_fp8.float(), q.float()) and not torch.equal(lin.weight_fp8.float(), before.float())
        torch.testing.assert_close(lin.weight_scale, scale.view(1, -1))


@cpu_fp8
def test_objective_uses_fp8_teacher_and_refuses_fsdp():
    model = _model()
    obj = build_objective(dict(kind="self_flow", mask_ratio=0.25, teacher_fp8=True), model.cfg)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    with pytest.raises(ValueError, match="fsdp"):
        obj.prepare_teacher(copy.deepcopy(ema), "fsdp")
    plain = copy.deepcopy(ema)
    with pytest.warns(UserWarning, match="slower"):
        obj.prepare_teacher(ema, "none")
    assert any(isinstance(m, Fp8Linear) for m in ema.modules())
    torch.manual_seed(1)
    loss, metrics = obj(model, ema, make_batch())
    torch.manual_seed(1)
    loss_ref, metrics_ref = obj(model, plain, make_batch())
    # Same noise and timesteps: only the teacher's target moves, and only slightly.
    assert torch.equal(metrics["flow_video"], metrics_ref["flow_video"])
    assert metrics["cos"] == pytest.approx(float(metrics_ref["cos"]), abs=5e-3)
    loss.backward()
    # Flow matching has no teacher: the flag is a no-op there.
    fm = build_objective(dict(kind="flow_matching", teacher_fp8=True), model.cfg)
    other = copy.deepcopy(plain)
    fm.prepare_teacher(other, "none")
    assert not any(isinstance(m, Fp8Linear) for m in other.modules())


@cpu_fp8
def test_fp8_teacher_needs_fp8_sized_layers():
    model = build_model("tiny", width=40, heads=4, depth=4, patch_size=8)  # 40 is not a multiple of 16
    obj = build_objective(dict(kind="self_flow", teacher_fp8=True), model.cfg)
    with pytest.raises(ValueError, match="multiples of 16"), pytest.warns(UserWarning):
        obj.prepare_teacher(copy.deepcopy(model), "none")


def test_fp8_teacher_on_a_cpu_without_the_kernel_is_refused_in_words(monkeypatch):
    monkeypatch.setattr(fp8_mod, "cpu_has_scaled_mm", lambda: False)  # as on torch <= 2.7
    with pytest.raises(ValueError, match="teacher_fp8 on CPU needs a row-wise CPU torch._scaled_mm"):
        use_fp8_teacher(_model(), 1)
