"""Objective math: DTS statistics, the teacher's input, and loss values against hand computation."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from selfflow_robot.models import TokenTimes, build_model
from selfflow_robot.objectives import build_objective, interpolate, sample_time, shift_time
from selfflow_robot.objectives.flow import masked_mse
from selfflow_robot.objectives.self_flow import cosine_loss, dts_index


def make_batch(B=4, T=2, H=6, A=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(context=torch.randint(0, 256, (B, 1, 16, 24, 3), dtype=torch.uint8, generator=g),
                future=torch.randint(0, 256, (B, T, 16, 24, 3), dtype=torch.uint8, generator=g),
                future_mask=torch.ones(B, T, dtype=torch.bool), actions=torch.randn(B, H, A, generator=g),
                action_mask=torch.ones(B, H, dtype=torch.bool), instruction=["pick", "place", "open", "close"][:B])


class Recorder:
    """Wraps a model and records every call's keyword arguments and outputs."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, **kw):
        out = self.model(**kw)
        self.calls.append((kw, out))
        return out


def test_time_samplers():
    torch.manual_seed(0)
    t = sample_time(200_000)
    assert 0 <= t.min() and t.max() <= 1 and abs(t.mean() - 0.5) < 0.01
    ln = sample_time(200_000, "logit_normal", mu=0.0, sigma=1.0)
    assert abs(ln.median() - 0.5) < 0.01
    assert torch.allclose(shift_time(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    shifted = sample_time(200_000, shift=3.0)
    assert abs(shifted.median() - 0.75) < 0.01  # median of U(0,1) is 0.5 -> s(3, 0.5) = 0.75


def test_dts_mask_fraction_and_token_marginal():
    torch.manual_seed(0)
    B, N, rm = 4000, 64, 0.25
    idx = dts_index((B, N), rm)
    assert abs(idx.float().mean() - rm) < 0.005
    t, s = sample_time(B), sample_time(B)
    assert (t > s).float().mean().sub(0.5).abs() < 0.03  # unsorted
    tau = torch.gather(torch.stack([t, s], 1), 1, idx)
    # every token's timestep is distributed as p(t) = U(0, 1): compare deciles
    q = torch.quantile(tau[:, :8].flatten(), torch.linspace(0.1, 0.9, 9))
    assert torch.allclose(q, torch.linspace(0.1, 0.9, 9), atol=0.02)
    # under a shifted logit-normal p(t) too
    t2, s2 = sample_time(B, "logit_normal", shift=2.0), sample_time(B, "logit_normal", shift=2.0)
    tau2 = torch.gather(torch.stack([t2, s2], 1), 1, idx)[:, :8].flatten()
    ref = sample_time(B * 8, "logit_normal", shift=2.0)
    qs = torch.linspace(0.1, 0.9, 9)
    assert torch.allclose(torch.quantile(tau2, qs), torch.quantile(ref, qs), atol=0.02)


def _setup(kind, **over):
    torch.manual_seed(0)
    model = build_model("tiny", depth=4, action_dim=7, frame_stride=2, patch_size=8)
    with torch.no_grad():  # non-trivial teacher features
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    obj = build_objective(dict(kind=kind, mask_ratio=0.25, **over), model.cfg)
    return model, ema, obj


def test_teacher_sees_min_t_s_with_student_noise():
    model, ema, obj = _setup("self_flow")
    student, teacher = Recorder(model), Recorder(ema)
    batch = make_batch()
    obj(student, teacher, batch)
    (skw, _), = student.calls
    (tkw, tout), = teacher.calls
    assert tkw["stop_after"] == model.cfg.k_teacher and set(tout) == {"features"}
    x0 = model.frames_to_tokens(batch["future"])
    vt: TokenTimes = skw["video_t"]
    t, s = vt.values[:, 0], vt.values[:, 1]
    tau = torch.gather(vt.values, 1, vt.index.flatten(1)).view(x0.shape[:4])[..., None]
    noise = (skw["video"] - (1 - tau) * x0) / tau  # the student's noise, recovered
    tmin = torch.minimum(t, s)
    expected = (1 - tmin)[:, None, None, None, None] * x0 + tmin[:, None, None, None, None] * noise
    torch.testing.assert_close(tkw["video"], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(tkw["video_t"], tmin)  # one level for every teacher token: plain broadcasting
    # both slots of the student are used, with roughly R_M of tokens on s; no unused clean slot
    assert 0.05 < vt.index.float().mean() < 0.5 and vt.values.shape[1] == 2
    assert skw["action_t"].values is vt.values  # video and actions share their slots
    # same conditioning for student and teacher
    assert torch.equal(skw["context"], tkw["context"]) and torch.equal(skw["text"], tkw["text"])


def test_loss_matches_hand_computation():
    model, ema, obj = _setup("self_flow", action_weight=0.5)
    student, teacher = Recorder(model), Recorder(ema)
    batch = make_batch()
    loss, metrics = obj(student, teacher, batch)
    (skw, sout), = student.calls
    (_, tout), = teacher.calls
    x0v = model.frames_to_tokens(batch["future"])
    vt = skw["video_t"]
    tau_v = torch.gather(vt.values, 1, vt.index.flatten(1)).view(x0v.shape[:4])[..., None]
    eps_v = (skw["video"] - (1 - tau_v) * x0v) / tau_v
    flow_v = ((sout["video"] - (eps_v - x0v)) ** 2).mean()
    at = skw["action_t"]
    tau_a = torch.gather(at.values, 1, at.index)[..., None]
    x0a = batch["actions"]
    eps_a = (skw["action"] - (1 - tau_a) * x0a) / tau_a
    flow_a = ((sout["action"] - (eps_a - x0a)) ** 2).mean()
    k, l = model.cfg.k_teacher, model.cfg.l_student
    rep = (1 - F.cosine_similarity(obj.head(sout["features"][l]), tout["features"][k], dim=-1)).mean()
    expected = flow_v + 0.5 * flow_a + 0.8 * rep
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(metrics["rep"], rep.detach(), rtol=1e-4, atol=1e-4)


def test_loss_pieces_on_explicit_numbers():
    pred = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])
    target = torch.zeros(1, 2, 2)
    s, n = masked_mse(pred, target, torch.tensor([[True, False]]))
    assert float(s) == 5.0 and float(n) == 1.0  # mean over channels (1 + 9) / 2
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    loss, cos = cosine_loss(a, b, None)
    assert abs(float(loss) - 0.5) < 1e-6 and abs(float(cos) - 0.5) < 1e-6


def test_flow_matching_uses_one_timestep_and_no_teacher():
    model, ema, obj = _setup("flow_matching")
    student, teacher = Recorder(model), Recorder(ema)
    obj(student, teacher, make_batch())
    (skw, _), = student.calls
    assert not teacher.calls and skw["video_t"].shape == (4,)  # one timestep per sample


def test_gradients_reach_student_and_head_not_teacher():
    model, ema, obj = _setup("self_flow")
    loss, _ = obj(model, ema, make_batch())
    loss.backward()
    assert all(p.grad is not None for p in obj.head.parameters())
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in ema.parameters())


def test_action_only_and_forward_dynamics_subsets():
    model, ema, obj = _setup("dts", action_only_fraction=0.5, forward_dynamics_fraction=1.0)
    student = Recorder(model)
    obj(student, None, make_batch())
    (jkw, _), (akw, _) = student.calls
    assert akw.get("video") is None and akw["action"].shape[0] == 2  # action-only half: no video tokens
    # forward dynamics: the joint half's actions are all clean (the last slot, value 0)
    assert jkw["action_t"].values.shape[1] == 3 and jkw["video_t"].values is jkw["action_t"].values
    assert torch.all(jkw["action_t"].index == 2) and torch.all(jkw["action_t"].values[:, 2] == 0)


def test_repa_loss(tmp_path):
    from selfflow_robot.objectives.repa import ConvEncoder

    torch.manual_seed(0)
    enc = ConvEncoder(32)
    save_file(enc.state_dict(), str(tmp_path / "enc.safetensors"))
    model = build_model("tiny", depth=4, action_dim=7, patch_size=8)
    obj = build_objective(dict(kind="repa", rep_weight=0.5, encoder=dict(kind="conv", dim=32, projector_dim=64,
                                                                          weights=str(tmp_path / "enc.safetensors"))), model.cfg)
    assert not any(p.requires_grad for p in obj.encoder.parameters())
    student = Recorder(model)
    batch = make_batch()
    loss, metrics = obj(student, None, batch)
    (skw, sout), = student.calls
    assert skw["video_t"].shape == (4,)  # REPA: plain flow matching, no DTS
    target = obj.target_features(batch["future"], (2, 3))
    pred = obj.projector(sout["features"][model.cfg.l_student][:, : 2 * 2 * 3])
    rep = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    torch.testing.assert_close(metrics["rep"], rep.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(loss, metrics["flow_video"] + metrics["flow_action"] + 0.5 * rep, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="weights"):
        build_objective(dict(kind="repa", encoder=dict(kind="conv", weights=str(tmp_path / "missing.safetensors"))), model.cfg)
    with pytest.raises(ValueError, match=r"do not fit objective.encoder .*dim=64.*size mismatch.*set objective.encoder.dim"):
        build_objective(dict(kind="repa", encoder=dict(kind="conv", weights=str(tmp_path / "enc.safetensors"))), model.cfg)


def test_repa_without_timm_says_how_to_install_it(tmp_path, monkeypatch):
    from selfflow_robot.cli import reported_errors

    save_file({}, str(tmp_path / "enc.safetensors"))
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    objective = dict(kind="repa", encoder=dict(kind="timm", name="vit_small_patch14_dinov2",
                                               weights=str(tmp_path / "enc.safetensors")))
    with pytest.raises(SystemExit) as exit_, reported_errors():
        build_objective(objective, build_model("tiny").cfg)
    assert str(exit_.value).splitlines()[0] == (
        "error: timm is needed for objective=repa with a timm encoder: pip install timm")


def test_bad_mask_ratio_is_named():
    with pytest.raises(ValueError, match="mask_ratio"):
        build_objective(dict(kind="self_flow", mask_ratio=0.7), build_model("tiny").cfg)


def test_independent_video_and_action_timesteps():
    model, ema, obj = _setup("self_flow", video_action_times="independent")
    student, teacher = Recorder(model), Recorder(ema)
    obj(student, teacher, make_batch())
    (skw, _), = student.calls
    (tkw, _), = teacher.calls
    vt, at = skw["video_t"], skw["action_t"]
    # slots t, s, t_a, s_a (the clean slot is dropped: no action is given); one tensor for both streams
    assert vt.values.shape[1] == 4 and int(vt.index.max()) <= 1 and int(at.index.min()) >= 2
    assert at.values is vt.values
    assert not torch.allclose(vt.values[:, 0], vt.values[:, 2])  # actions drew their own t
    torch.testing.assert_close(tkw["video_t"], torch.minimum(vt.values[:, 0], vt.values[:, 1]))
    torch.testing.assert_close(tkw["action_t"], torch.minimum(vt.values[:, 2], vt.values[:, 3]))
    with pytest.raises(ValueError, match="video_action_times"):
        build_objective(dict(kind="dts", video_action_times="sometimes"), model.cfg)


def test_action_only_count_keeps_its_fraction_in_small_micro_batches():
    """Gradient accumulation splits a batch of 8 into micro-batches of 2: 2 * 0.25 rounded down
    would switch the action-only mode off; rounded at random the expected share stays 0.25."""
    import types

    from selfflow_robot.objectives.self_flow import SelfFlowObjective

    obj = types.SimpleNamespace(cfg=types.SimpleNamespace(action_only_fraction=0.25))
    count = lambda b: SelfFlowObjective._action_only_count(obj, b)  # noqa: E731
    torch.manual_seed(0)
    assert {count(16) for _ in range(20)} == {4}  # an exact share draws nothing
    draws = [count(2) for _ in range(4000)]
    assert set(draws) == {0, 1} and abs(sum(draws) / (2 * len(draws)) - 0.25) < 0.02
    assert count(1) == 0  # one sample always goes through the joint pass


def test_action_only_samples_get_the_arms_objective_when_asked():
    """action_only_objective=same: the action-only half gets DTS (per-token times) and the teacher's
    representation loss on the same action-only input; the default keeps one plain t per sample."""
    for mode in ("flow_matching", "same"):
        model, ema, obj = _setup("self_flow", action_only_fraction=0.5, action_only_objective=mode)
        student, teacher = Recorder(model), Recorder(ema)
        loss, metrics = obj(student, teacher, make_batch())
        akw = student.calls[1][0]
        assert akw.get("video") is None and akw["action"].shape[0] == 2
        teacher_action_only = [kw for kw, _ in teacher.calls if kw.get("video") is None]
        if mode == "same":
            assert isinstance(akw["action_t"], TokenTimes) and len(teacher_action_only) == 1
            assert teacher_action_only[0]["action"].shape[0] == 2
        else:
            assert akw["action_t"].shape == (2,) and not teacher_action_only
        assert torch.isfinite(loss) and "rep" in metrics
    with pytest.raises(ValueError, match="action_only_objective must be flow_matching|same"):
        build_objective(dict(kind="dts", action_only_objective="dts"), model.cfg)


def test_pretraining_on_video_clips_uses_the_papers_video_mask_ratio():
    """The paper's R_M is 0.25 for images and 0.1 for video; pretraining trains on video clips."""
    from selfflow_robot import cli

    for objective in ("self_flow", "dts"):
        assert cli.compose("pretrain", [f"objective={objective}"]).objective.mask_ratio == 0.1
    assert cli.compose("pretrain", ["objective.mask_ratio=0.25"]).objective.mask_ratio == 0.25
