"""The released Self-Flow network (official class, random weights) against its conversion.

Relation (docs/model.md): converted(video=x, video_t=t, class_labels=y)["video"] equals the
release's forward(x, t, y) -- both the velocity eps - x0 at t (0 clean, 1 noise) -- up to the
patch order; block-20 raw features are equal, and the objective head equals the projector.
The XL case builds the official 675M model and its conversion once, in fp32 on the CPU: two
forwards of each at batch 1 (~5.7 GB peak RSS; time in docs/model.md).
"""
import pytest
import torch
from einops import rearrange

from selfflow_robot.convert import convert_release, read_release_state

from selfflow_release import release_modules

P, C = 2, 4


def official_model(size: int, width: int, depth: int, heads: int, classes: int = 1001, seed: int = 0):
    model_mod, _ = release_modules()
    torch.manual_seed(seed)
    m = model_mod.SelfFlowPerTokenDiT(input_size=size, patch_size=P, in_channels=C, hidden_size=width, depth=depth,
                                      num_heads=heads, mlp_ratio=4.0, num_classes=classes, learn_sigma=True,
                                      compatibility_mode=True)
    with torch.no_grad():  # random weights everywhere (the release zero-inits adaLN and the head)
        for name, p in m.named_parameters():
            if name == "pos_embed":
                continue
            fan_in = p.shape[1] if p.dim() == 2 and "embedding_table" not in name else 1
            p.normal_(0.0, fan_in ** -0.5 if p.dim() == 2 else 0.1)
    return m.eval()


def to_official(z):  # [B, C, H, W] latents -> release tokens [B, N, (c p q)]
    return rearrange(z, "b c (h p) (w q) -> b (h w) (c p q)", p=P, q=P)


def to_ours(z):
    return rearrange(z, "b c (h p) (w q) -> b 1 h w (p q c)", p=P, q=P)


def ours_to_official(v):
    return rearrange(v, "b 1 h w (p q c) -> b (h w) (c p q)", p=P, q=P, c=C)


def check_parity(official, size, batch=2, tol=1e-5, projector=True):
    ours, head, _ = convert_release(official.state_dict(), "test", heads=official.num_heads, patch_size=P)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, C, size, size, generator=g)
    n = (size // P) ** 2
    labels = torch.tensor([207, 1000] + [3] * (batch - 2))[:batch]
    results = {}
    with torch.no_grad():
        for name, t in (("scalar", torch.rand(batch, generator=g)), ("per-token", torch.rand(batch, n, generator=g))):
            ref, raw = official(to_official(z), t, labels, return_raw_features=20 if len(ours.blocks) >= 20 else 1)
            t_ours = t if t.dim() == 1 else t.view(batch, 1, size // P, size // P)
            tap = 20 if len(ours.blocks) >= 20 else 1
            out = ours(video=to_ours(z), video_t=t_ours, class_labels=labels, taps=(tap,))
            diff = (ours_to_official(out["video"]) - ref).abs().max().item()
            feat = (out["features"][tap] - raw).abs().max().item()
            assert diff <= tol, f"{name} timesteps: velocity differs by {diff:.3g} (output scale {ref.abs().max():.3g})"
            assert feat <= tol * max(1.0, raw.abs().max().item()), f"{name}: block-{tap} features differ by {feat:.3g}"
            results[name] = (diff, ref.abs().max().item())
        if not projector:
            return ours, results
        # the Self-Flow projector (student head) on block-8 features
        _, proj = official(to_official(z), torch.full((batch,), 0.3), labels, return_features=1)
        student = ours(video=to_ours(z), video_t=torch.full((batch,), 0.3), class_labels=labels, taps=(1,))
        from selfflow_robot.objectives import projection_head

        mine = projection_head(ours.cfg.width)
        mine.load_state_dict({k.removeprefix("head."): v for k, v in head.items()})
        assert (mine(student["features"][1]) - proj).abs().max().item() <= tol * max(1.0, proj.abs().max().item())
    return ours, results


def test_small_release_matches_conversion():
    official = official_model(size=8, width=64, depth=2, heads=4)
    _, results = check_parity(official, 8, batch=3)
    assert all(scale > 0.1 for _, scale in results.values())  # the comparison is not of near-zero outputs


def test_converter_reads_layouts_and_refuses_others(tmp_path):
    official = official_model(size=8, width=64, depth=2, heads=4, classes=11)
    sd = official.state_dict()
    for name, payload in (("plain", sd), ("model", {"model": sd, "args": {"x": 1}}),
                          ("state_dict", {"state_dict": {"module." + k: v for k, v in sd.items()}})):
        torch.save(payload, tmp_path / f"{name}.pt")
        got = read_release_state(tmp_path / f"{name}.pt")
        assert set(got) == set(sd), name
    bad = dict(sd)
    bad.pop("blocks.1.attn.qkv.bias")
    bad["blocks.1.extra"] = torch.zeros(3)
    bad["t_embedder.mlp.2.weight"] = torch.zeros(64, 65)
    with pytest.raises(ValueError, match=r"(?s)missing: blocks\.1\.attn\.qkv\.bias.*unexpected: blocks\.1\.extra"
                                         r".*t_embedder\.mlp\.2\.weight: shape \(64, 65\), expected \(64, 64\)"):
        convert_release(bad, "bad.pt", heads=4)
    torch.save({"ema": sd}, tmp_path / "ema.pt")
    with pytest.raises(ValueError, match=r"ema\.pt: expected a state dict of tensors .*\['ema'\]"):
        read_release_state(tmp_path / "ema.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"module\.pt: not readable with torch\.load\(weights_only=True\)"):
        read_release_state(tmp_path / "module.pt")


def test_convert_cli_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
    import sys

    from selfflow_robot import convert
    from selfflow_robot.models import load_checkpoint_model
    from selfflow_robot.train.checkpoint import read_safetensors

    official = official_model(size=8, width=64, depth=2, heads=4, classes=11)
    extra = {"teacher.proj.weight": torch.zeros(2, 2)}  # a training-time tensor: refused unless ignored
    torch.save({"model": {**official.state_dict(), **extra}}, tmp_path / "release.pt")
    argv = ["convert", "selfflow_release", f"ckpt={tmp_path / 'release.pt'}", f"out={tmp_path / 'conv'}", "heads=4"]
    monkeypatch.setattr(sys, "argv", list(argv))  # the CLI pops the verb from sys.argv
    with pytest.raises(SystemExit, match=r"unexpected: teacher\.proj\.weight \(2, 2\)"):
        convert.cli_main()
    monkeypatch.setattr(sys, "argv", argv + ["ignore=[teacher.]"])
    convert.cli_main()
    model, config = load_checkpoint_model(tmp_path / "conv")
    assert config["model"]["positions"] == "sincos2d" and config["model"]["num_classes"] == 11
    assert set(read_safetensors(tmp_path / "conv" / "objective.safetensors")) == {
        "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    z = torch.randn(2, C, 8, 8)
    with torch.no_grad():
        ref = official(to_official(z), torch.tensor([0.2, 0.9]), torch.tensor([1, 10]))
        out = model(video=to_ours(z), video_t=torch.tensor([0.2, 0.9]), class_labels=torch.tensor([1, 10]))["video"]
    assert (ours_to_official(out) - ref).abs().max() <= 1e-5


def test_lone_image_is_the_release_after_adding_action_layers():
    """A converted model given action layers (as fine-tuning does): a lone frame's velocity is still
    the release's; action tokens start at velocity 0; a second frame is attended to."""
    official = official_model(size=8, width=64, depth=2, heads=4, classes=11)
    ours, _, _ = convert_release(official.state_dict(), "test", heads=4)
    z, t = torch.randn(2, C, 8, 8), torch.tensor([0.4, 0.7])
    with torch.no_grad():
        ref = official(to_official(z), t, torch.tensor([10, 10]))
        clip = torch.cat([to_ours(z), to_ours(torch.randn(2, C, 8, 8))], 1)  # 2 frames: the first is the image
        ours.add_action_layers(7)
        both = ours(video=to_ours(z), video_t=t, action=torch.randn(2, 3, 7), action_t=t)
        alone = ours(video=to_ours(z), video_t=t)
        two = ours(video=clip, video_t=t)
    assert (ours_to_official(alone["video"]) - ref).abs().max() <= 1e-5
    # rotary acts on time only and is relative: the same lone frame at another time is unchanged
    ours._positions = lambda T, h, w, t0, device, f=ours._positions: f(T, h, w, t0 + 3.0, device)
    with torch.no_grad():
        shifted = ours(video=to_ours(z), video_t=t)
    assert (shifted["video"] - alone["video"]).abs().max() <= 1e-5
    # action tokens join the attention: at initialisation they change the image (their embedding is
    # new); the lone-image path (no actions) is what stays the release
    assert both["action"].abs().max() == 0  # zero-initialised action head
    assert not torch.allclose(two["video"][:, :1], alone["video"])  # frames attend to each other


@pytest.mark.slow
def test_xl_release_matches_conversion():
    """Full SiT-XL/2 (675M): one forward per timestep kind in fp32 on the CPU."""
    official = official_model(size=32, width=1152, depth=28, heads=16)
    assert sum(p.numel() for p in official.parameters() if p.requires_grad) > 670e6
    _, results = check_parity(official, 32, batch=1, projector=False)  # the head is checked at the small size
    assert all(scale > 0.1 for _, scale in results.values())


def test_class_conditioning_in_cached_sampling_paths():
    """Robot sampling (prefix cache + precomputed modulation) runs with the null class, as forward does
    without labels; labels change the output."""
    from selfflow_robot.models import build_model

    torch.manual_seed(0)
    m = build_model("tiny", patch_size=2, in_channels=4, positions="sincos2d", num_classes=5, text="none",
                    action_dim=3).eval()
    with torch.no_grad():
        for p in m.parameters():  # adaLN-Zero would hide the conditioning
            p.add_(torch.randn_like(p) * 0.05)
        ctx, video, act = torch.randn(2, 1, 3, 4, 16), torch.randn(2, 1, 3, 4, 16), torch.randn(2, 6, 3)
        t = torch.full((2,), 0.6)
        ref = m(video=video, video_t=t, action=act, action_t=t, context=ctx, context_t=torch.zeros(2))
        null = m(video=video, video_t=t, action=act, action_t=t, context=ctx, context_t=torch.zeros(2),
                 class_labels=torch.tensor([4, 4]))
        other = m(video=video, video_t=t, action=act, action_t=t, context=ctx, context_t=torch.zeros(2),
                  class_labels=torch.tensor([1, 2]))
        prefix = m.encode_prefix(context=ctx, context_t=torch.zeros(2))
        cached = m(video=video, video_t=t, action=act, action_t=t, prefix=prefix,
                   modulation=m.modulation_schedule(torch.tensor([0.6]), 2)[0])
    torch.testing.assert_close(null["video"], ref["video"])
    torch.testing.assert_close(cached["video"], ref["video"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached["action"], ref["action"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other["video"], ref["video"])
    with pytest.raises(ValueError, match="model.num_classes=0"):
        build_model("tiny", text="none")(video=torch.randn(2, 1, 1, 1, 192), video_t=t,
                                         class_labels=torch.tensor([1, 2]))


def test_real_release_checkpoint():
    """With the downloaded weights: SELFFLOW_RELEASE_CKPT=selfflow_imagenet256.pt pytest -k real_release.
    One fp32 forward of the official class with the real weights vs the converted checkpoint."""
    import os

    ckpt = os.environ.get("SELFFLOW_RELEASE_CKPT")
    if not ckpt:
        pytest.skip("set SELFFLOW_RELEASE_CKPT to the downloaded selfflow_imagenet256.pt to check a real conversion")
    model_mod, _ = release_modules()
    official = model_mod.SelfFlowPerTokenDiT(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                                              num_heads=16, mlp_ratio=4.0, num_classes=1001, learn_sigma=True,
                                              compatibility_mode=True)
    official.load_state_dict(read_release_state(ckpt), strict=True)
    check_parity(official.eval(), 32, batch=1, tol=1e-4, projector=False)
