"""sample_images: the release's SDE sampler restated for converted checkpoints gives the same
tensors as the official denoise_loop on the official model (random weights, few steps)."""
import sys

import pytest
import torch
from einops import rearrange

from selfflow_release import release_modules
from test_selfflow_release import official_model

from selfflow_robot.convert import convert_release
from selfflow_robot.sample_images import release_sde, release_velocity


def official_samples(official, noise_tokens, labels, steps, cfg_scale, low, high):
    _, sampling = release_modules()
    x, vector = noise_tokens, labels
    if cfg_scale > 1.0:  # as the release's sample_batch
        x = torch.cat([x, x])
        vector = torch.cat([torch.full_like(labels, 1000), labels])
    out = sampling.denoise_loop(model=official, num_steps=steps, cfg_scale=cfg_scale if cfg_scale > 1.0 else None,
                                guidance_low=low, guidance_high=high, mode="SDE", x=x, x_ids=None, vector=vector)
    return out[len(labels):] if cfg_scale > 1.0 else out


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sampler_matches_official(cfg_scale):
    official = official_model(size=8, width=64, depth=2, heads=4)
    ours, _, _ = convert_release(official.state_dict(), "test", heads=4)
    labels = torch.tensor([207, 360])
    results = []
    for run in ("official", "ours"):
        torch.manual_seed(5)
        noise = rearrange(torch.randn(2, 4, 8, 8), "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)
        with torch.no_grad():
            if run == "official":
                results.append(official_samples(official, noise, labels, 6, cfg_scale, 0.0, 0.7))
            else:
                results.append(release_sde(release_velocity(ours, 2, 4, (4, 4)), noise, labels, 6, cfg_scale, 0.0, 0.7))
    ref, got = results
    assert ref.shape == got.shape == (2, 16, 16)
    diff = (ref - got).abs().max().item()
    assert diff <= 1e-4 * max(1.0, ref.abs().max().item()), f"samples differ by {diff:.3g}"


def tiny_vae(folder):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(folder)
    return vae


def test_sample_images_cli_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from PIL import Image

    from selfflow_robot import sample_images
    from selfflow_robot.train.checkpoint import read_safetensors

    from selfflow_robot import convert

    official = official_model(size=8, width=64, depth=2, heads=4)
    torch.save({"model": official.state_dict()}, tmp_path / "release.pt")
    tiny_vae(tmp_path / "vae")
    monkeypatch.setattr(sys, "argv", ["convert", "selfflow_release", f"ckpt={tmp_path / 'release.pt'}", "heads=4",
                                      f"out={tmp_path / 'conv'}", f"vae={tmp_path / 'vae'}"])
    convert.cli_main()  # the SD-VAE goes into the checkpoint: sample_images needs no vae=
    monkeypatch.setattr(sys, "argv", ["sample_images", f"ckpt={tmp_path / 'conv'}",
                                      "classes=[207,360,1]", "steps=4", "latent_size=8", "cfg_scale=2.0",
                                      f"out={tmp_path / 'grid.png'}", f"save_latents={tmp_path / 'z.safetensors'}"])
    sample_images.cli_main()
    assert Image.open(tmp_path / "grid.png").size == (3 * 16, 16)  # 8x8 latents, downsample 2
    z = read_safetensors(tmp_path / "z.safetensors")["latents"]
    assert z.shape == (3, 4, 8, 8) and torch.isfinite(z).all()
