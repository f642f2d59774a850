"""An optional frozen frame autoencoder: the backbone then patches its latents instead of pixels.

`python -m selfflow_robot.autoencoder dataset=... out=DIR` trains one on a dataset's frames and
writes DIR/config.json + DIR/model.safetensors (no pickle). `model.autoencoder=DIR` then loads it,
frozen, inside SelfFlowDiT; its weights are also saved in every checkpoint of that model, so a
checkpoint stays self-contained. Latents are scaled to unit variance (SD-VAE's 0.18215 idea),
measured on the training frames.

`model.autoencoder=DIR` also takes a diffusers `AutoencoderKL` folder (config.json +
diffusion_pytorch_model.safetensors), e.g. the SD-VAE `stabilityai/sd-vae-ft-ema` of the
released Self-Flow ImageNet model: frozen, latents (mean of the posterior - shift_factor) x
scaling_factor as its config says (0.18215 for the SD-VAE), needs `pip install diffusers`.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(min(8, cin), cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))


class FrameAutoencoder(nn.Module):
    """Conv encoder / decoder with a `downsample`-times smaller latent of `channels` channels."""

    def __init__(self, channels: int = 4, width: int = 64, downsample: int = 8, scale: float = 1.0):
        super().__init__()
        n = int(math.log2(downsample))
        if 2**n != downsample or n < 1:
            raise ValueError(f"autoencoder downsample must be a power of two >= 2, got {downsample}")
        self.config = dict(channels=channels, width=width, downsample=downsample, scale=scale)
        enc = [nn.Conv2d(3, width, 3, padding=1)]
        for _ in range(n):
            enc += [_block(width, width), nn.Conv2d(width, width, 4, stride=2, padding=1)]
        enc += [_block(width, width), nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1)]
        dec = [nn.Conv2d(channels, width, 3, padding=1)]
        for _ in range(n):
            dec += [_block(width, width), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        dec += [_block(width, width), nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> scaled latents [N, C, H/d, W/d]."""
        return self.encoder(x) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def save(self, out: str) -> None:
        from ..fileio import write_json_atomic
        from ..train.checkpoint import save_tensors

        os.makedirs(out, exist_ok=True)
        self.config["scale"] = float(self.scale)
        tmp = os.path.join(out, ".model.safetensors.tmp")
        save_tensors(self.state_dict(), tmp)
        os.replace(tmp, os.path.join(out, "model.safetensors"))
        write_json_atomic(os.path.join(out, "config.json"), self.config, indent=1)


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _diffusers_spec(path: str, cfg: dict) -> dict:
    if cfg.get("_class_name") != "AutoencoderKL":
        raise ValueError(f"model.autoencoder={path}: a diffusers {cfg.get('_class_name')}; only AutoencoderKL "
                         "(e.g. the SD-VAE) is supported")
    if not os.path.isfile(os.path.join(path, DIFFUSERS_WEIGHTS)):
        raise FileNotFoundError(f"model.autoencoder={path}: no {DIFFUSERS_WEIGHTS} there (pickled .bin weights are "
                                "not read; save the model with safe_serialization=True)")
    return dict(kind="diffusers_kl", channels=int(cfg["latent_channels"]),
                downsample=2 ** (len(cfg["block_out_channels"]) - 1),
                scale=float(cfg.get("scaling_factor") or 1.0), shift=float(cfg.get("shift_factor") or 0.0),
                config={k: v for k, v in cfg.items() if not k.startswith("_")}, path=os.path.abspath(path))


def autoencoder_spec(path: str) -> dict:
    """The architecture of a trained autoencoder directory, or of a diffusers AutoencoderKL folder."""
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            cfg = json.load(f)
        if "_class_name" in cfg:
            return _diffusers_spec(path, cfg)
    if not os.path.isfile(cfg_file) or not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"model.autoencoder={path}: expected config.json and model.safetensors there "
                                "(train one with python -m selfflow_robot.autoencoder)")
    with open(cfg_file) as f:
        return dict(json.load(f), path=os.path.abspath(path))


class DiffusersAutoencoder(nn.Module):
    """A diffusers AutoencoderKL behind FrameAutoencoder's encode/decode (scaled latents)."""

    def __init__(self, spec: dict):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ImportError(f"model.autoencoder={spec.get('path')} is a diffusers AutoencoderKL: "
                              f"pip install diffusers ({e})") from None
        path = spec.get("path")
        if path and os.path.isfile(os.path.join(path, DIFFUSERS_WEIGHTS)):
            self.vae = AutoencoderKL.from_pretrained(path, use_safetensors=True, local_files_only=True,
                                                      low_cpu_mem_usage=False)
        else:  # a checkpoint of the full model carries the weights
            self.vae = AutoencoderKL.from_config(spec["config"])
        self.scale, self.shift = float(spec["scale"]), float(spec.get("shift", 0.0))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> scaled latents; the posterior's mean (deterministic latents)."""
        return (self.vae.encode(x).latent_dist.mean - self.shift) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scale + self.shift).sample


def build_frozen_autoencoder(spec: dict) -> nn.Module:
    """From a spec dict (channels/width/downsample/scale[/path], or a diffusers one); loads weights
    when the path exists (a checkpoint of the full model carries the weights anyway)."""
    if spec.get("kind") == "diffusers_kl":
        return DiffusersAutoencoder(spec).eval().requires_grad_(False)
    ae = FrameAutoencoder(int(spec["channels"]), int(spec["width"]), int(spec["downsample"]), float(spec.get("scale", 1.0)))
    path = spec.get("path")
    if path and os.path.isfile(os.path.join(path, "model.safetensors")):
        from ..train.checkpoint import read_safetensors

        ae.load_state_dict(read_safetensors(os.path.join(path, "model.safetensors")))
    return ae.eval().requires_grad_(False)
