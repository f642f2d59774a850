"""`python -m selfflow_robot.sample_images ckpt=DIR vae=DIR classes=[207,360] out=grid.png`.

The Self-Flow release's sampler, restated for a converted checkpoint (see convert.py): SiT's
Euler-Maruyama SDE in SiT time s (0 noise, 1 data; s = 1 - t), diffusion sigma(s) = 1 - s, drift
v + sigma * score with score = (s v - x) / (1 - s), 250 points from s = 0 to 0.96 and a last mean
step of 0.04; classifier-free guidance with the null class 1000, applied while t lies in
[guidance_low, guidance_high]. The state and its noise draws keep the release's token layout
([B, N, (c p q)]) and random-number order, so the same seed gives the same images as its
sample.py (docs/model.md says how to check on a GPU).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from einops import rearrange
from omegaconf import DictConfig

from . import cli

NULL_CLASS = 1000


def release_velocity(model, patch: int, channels: int, grid: tuple[int, int]) -> Callable:
    """f(x, t, labels) on release tokens [B, N, (c p q)] -> the model's velocity in that layout."""
    h, w = grid

    def f(x, t, labels):
        video = rearrange(x, "b (h w) (c p q) -> b 1 h w (p q c)", h=h, w=w, p=patch, q=patch, c=channels)
        t = t.float()
        v = model(video=video.to(next(model.parameters()).dtype), video_t=t, class_labels=labels)["video"]
        return rearrange(v, "b 1 h w (p q c) -> b (h w) (c p q)", p=patch, q=patch, c=channels)

    return f


@torch.no_grad()
def release_sde(velocity: Callable, x: torch.Tensor, labels: torch.Tensor, steps: int = 250, cfg_scale: float = 1.0,
                guidance_low: float = 0.0, guidance_high: float = 1.0, last_step: float = 0.04) -> torch.Tensor:
    """The release's SDE sampling of x (noise, release token layout) -> latents in that layout.
    With cfg_scale > 1, x and labels are doubled (null half first) and the conditional half returned."""
    guided = cfg_scale > 1.0
    if guided:
        x = torch.cat([x, x])
        labels = torch.cat([torch.full_like(labels, NULL_CLASS), labels])

    def sit_velocity(x, s):  # the release's model_fn: the model sees t = 1 - s; SiT's velocity is -v
        t = 1 - s
        use_cfg = guided and bool(torch.all((guidance_low <= t) & (t <= guidance_high)).item())
        if use_cfg:
            half = x.shape[0] // 2
            x = torch.cat((x[half:], x[half:]))
        v = velocity(x, t, labels).to(torch.float32)
        if use_cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
            v = torch.cat((v, v))
        return -v

    def drift(x, s):  # velocity + sigma(s) * score, in the release's order of operations
        v = sit_velocity(x, s)
        s = s.view(-1, *[1] * (x.dim() - 1))
        sigma = 1 - s
        score = (s * v - x) / (sigma**2 - s * -1 * sigma)
        return v + 1.0 * sigma * score

    grid = torch.linspace(0, 1 - last_step, steps)
    dt = grid[1] - grid[0]
    for si in grid[:-1]:
        w = torch.randn(x.size()).to(x)  # drawn on the CPU generator, as the release does
        s = torch.ones(x.size(0)).to(x) * si
        diffusion = 1.0 * (1 - s.view(-1, *[1] * (x.dim() - 1)))
        mean = x + drift(x, s) * dt
        x = mean + torch.sqrt(2 * diffusion) * (w * torch.sqrt(dt))
    s_last = torch.ones(x.size(0), device=x.device) * (1 - last_step)
    x = x + drift(x, s_last) * last_step
    return x[x.shape[0] // 2:] if guided else x


def decode_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, C, H, W] -> uint8 [B, H, W, 3] (the release's (x + 1) / 2, x 255, truncated)."""
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        img = vae.decode(latents.to(dtype)).float()
    img = ((img + 1) / 2).clamp(0, 1)
    return (img.permute(0, 2, 3, 1) * 255).to(torch.uint8).cpu()


def save_grid(images: torch.Tensor, out: str | Path) -> Path:
    from PIL import Image

    n = images.shape[0]
    cols = min(n, 8)
    rows = -(-n // cols)
    H, W = images.shape[1:3]
    grid = torch.zeros(rows * H, cols * W, 3, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = img
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(out)
    return out


def main(cfg: DictConfig) -> Path:
    from .models import load_checkpoint_model
    from .models.autoencoder import autoencoder_spec, build_frozen_autoencoder
    from .train.distributed import pick_device

    if str(cfg.mode).upper() != "SDE":
        raise ValueError(f"mode={cfg.mode}: the release samples with the SDE only")
    device = pick_device(str(cfg.device))
    model, _ = load_checkpoint_model(cfg.ckpt, device)
    mc = model.cfg
    if mc.num_classes <= NULL_CLASS:
        raise ValueError(f"ckpt={cfg.ckpt}: model.num_classes={mc.num_classes}; class sampling needs the release's "
                         f"1001 (1000 ImageNet classes + the null class {NULL_CLASS})")
    classes = torch.tensor([int(c) for c in cfg.classes], dtype=torch.long)
    if classes.numel() == 0 or classes.min() < 0 or classes.max() >= mc.num_classes:
        raise ValueError(f"classes={list(cfg.classes)}: ids must lie in [0, {mc.num_classes})")
    if cfg.vae:
        vae = build_frozen_autoencoder(autoencoder_spec(str(cfg.vae))).to(device)
    elif model.autoencoder is not None:
        vae = model.autoencoder
    else:
        raise ValueError("vae= is not set and the checkpoint has no model.autoencoder: pass vae=SD_VAE_DIR "
                         "(a diffusers AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-ema)")
    precision = str(cfg.precision)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    p, C, size = mc.patch_size, mc.in_channels, int(cfg.latent_size)
    torch.manual_seed(int(cfg.seed))
    noise = torch.randn(len(classes), C, size, size, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    x = rearrange(noise, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)
    velocity = release_velocity(model, p, C, (size // p, size // p))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        z = release_sde(velocity, x, classes.to(device), int(cfg.steps), float(cfg.cfg_scale),
                        float(cfg.guidance_low), float(cfg.guidance_high))
    latents = rearrange(z.float(), "b (h w) (c p q) -> b c (h p) (w q)", h=size // p, p=p, q=p, c=C)
    if cfg.save_latents:
        from .train.checkpoint import save_tensors

        save_tensors({"latents": latents, "classes": classes}, Path(cfg.save_latents))
    if bf16:  # sample.py decodes with the VAE in bf16
        vae = vae.to(torch.bfloat16)
    out = save_grid(decode_images(vae, latents), cfg.out)
    print(f"wrote {out} ({len(classes)} images, classes {classes.tolist()}, {cfg.steps} SDE steps, "
          f"cfg {cfg.cfg_scale}, seed {cfg.seed})")
    return out


def cli_main() -> None:
    cli.run("sample_images", main)


if __name__ == "__main__":
    cli_main()
