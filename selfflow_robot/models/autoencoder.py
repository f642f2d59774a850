"""An optional frozen frame autoencoder: the backbone then patches its latents instead of pixels.

`python -m selfflow_robot.autoencoder dataset=... out=DIR` trains one on a dataset's frames and
writes DIR/config.json + DIR/model.safetensors (no pickle). `model.autoencoder=DIR` then loads it,
frozen, inside SelfFlowDiT; its weights are also saved in every checkpoint of that model, so a
checkpoint stays self-contained. Latents are scaled to unit variance (SD-VAE's 0.18215 idea),
measured on the training frames.
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


def autoencoder_spec(path: str) -> dict:
    """The architecture of a trained autoencoder directory (for the model config)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file) or not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"model.autoencoder={path}: expected config.json and model.safetensors there "
                                "(train one with python -m selfflow_robot.autoencoder)")
    with open(cfg_file) as f:
        return dict(json.load(f), path=os.path.abspath(path))


def build_frozen_autoencoder(spec: dict) -> FrameAutoencoder:
    """From a spec dict (channels/width/downsample/scale[/path]); loads weights when the path exists
    (a checkpoint of the full model carries the weights anyway)."""
    ae = FrameAutoencoder(int(spec["channels"]), int(spec["width"]), int(spec["downsample"]), float(spec.get("scale", 1.0)))
    path = spec.get("path")
    if path and os.path.isfile(os.path.join(path, "model.safetensors")):
        from ..train.checkpoint import read_safetensors

        ae.load_state_dict(read_safetensors(os.path.join(path, "model.safetensors")))
    return ae.eval().requires_grad_(False)
