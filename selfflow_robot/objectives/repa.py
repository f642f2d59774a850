"""REPA baseline: align a student block with a frozen external image encoder (lambda = 0.5).

The encoder is built from a local model definition and a local weights file (safetensors), never
downloaded: `timm` or `torchvision` architectures by name, or the built-in `conv` encoder. Its
feature map of each clean frame is resized to the model's token grid, and a projector MLP
(width -> hidden -> hidden -> encoder dim, SiLU) on the student's block-l video tokens is trained
to match it with 1 - cosine per token.
"""
from __future__ import annotations

import importlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .self_flow import SelfFlowObjective, cosine_loss

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _encoder_library(kind: str):
    """timm or torchvision: optional, only REPA with such an encoder imports them."""
    try:
        return importlib.import_module(kind)
    except ModuleNotFoundError as e:  # the CLI prints an ImportError as one `error:` line
        if e.name != kind:  # installed, but one of its own dependencies is missing: that error names it
            raise
        raise ImportError(f"{kind} is needed for objective=repa with a {kind} encoder: pip install {kind}") from e


class ConvEncoder(nn.Module):
    """A small conv net (stride 8) usable as a REPA target when no large encoder is at hand."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, dim // 2, 3, 2, 1), nn.GELU(), nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 2, 1))
        self.dim = dim

    def forward(self, x):
        return self.net(x)


class FrozenEncoder(nn.Module):
    """Wraps an encoder so that forward(uint8 [N, H, W, 3]) -> feature map [N, C, h', w']."""

    def __init__(self, kind: str, name: str | None, weights: str | None, resolution: int | None, dim: int = 64):
        super().__init__()
        if weights in (None, "???", ""):
            raise ValueError("objective.encoder.weights is not set: REPA needs the frozen encoder's weights as a "
                             "local .safetensors file (docs/model.md shows how to save DINOv2's)")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"REPA encoder weights not found: {weights} (objective.encoder.weights must be "
                                    "a local .safetensors file)")
        if kind == "conv":
            net = ConvEncoder(dim)
        elif kind == "timm":
            net = _encoder_library("timm").create_model(name, pretrained=False, num_classes=0)
        elif kind == "torchvision":
            torchvision = _encoder_library("torchvision")
            net = nn.Sequential(*list(torchvision.models.get_model(name, weights=None).children())[:-2])
        else:
            raise ValueError(f"objective.encoder.kind must be conv|timm|torchvision, got {kind!r}")
        from ..train.checkpoint import read_safetensors

        try:
            missing, unexpected = net.load_state_dict(read_safetensors(weights), strict=False)
        except RuntimeError as e:  # shapes differ: another width (conv: objective.encoder.dim) or model name
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise ValueError(f"REPA encoder weights {weights} do not fit objective.encoder (kind={kind}, "
                             f"name={name}, dim={dim}): {first}" + (" — set objective.encoder.dim to the width the "
                             "conv encoder was trained with" if kind == "conv" else "")) from None
        if missing:
            raise ValueError(f"REPA encoder weights {weights} lack parameters: {missing[:5]}")
        self.kind, self.net, self.resolution = kind, net.eval().requires_grad_(False), resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            self.dim = self(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).shape[1]

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        if self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        if self.kind == "timm":
            tokens = self.net.forward_features(x)  # [N, prefix + h*w, C] for ViTs
            n_prefix = getattr(self.net, "num_prefix_tokens", 0)
            tokens = tokens[:, n_prefix:]
            side = int(tokens.shape[1] ** 0.5)
            return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        return self.net(x)


class REPAObjective(SelfFlowObjective):
    def __init__(self, cfg, model_cfg, encoder_cfg: dict):
        super().__init__(cfg, model_cfg)
        self.encoder = FrozenEncoder(encoder_cfg.get("kind", "conv"), encoder_cfg.get("name"), encoder_cfg.get("weights"),
                                     encoder_cfg.get("resolution"), encoder_cfg.get("dim", 64))
        hidden = encoder_cfg.get("projector_dim", 2048)
        self.projector = nn.Sequential(nn.Linear(model_cfg.width, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                       nn.SiLU(), nn.Linear(hidden, self.encoder.dim))

    def _student_taps(self):
        return (self.l,)

    def target_features(self, frames: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] -> encoder features on the token grid, [B, T*h*w, C]."""
        B, T = frames.shape[:2]
        fmap = self.encoder(frames.flatten(0, 1))
        fmap = F.interpolate(fmap.float(), size=grid, mode="bilinear", align_corners=False)
        return fmap.flatten(2).transpose(1, 2).reshape(B, T * grid[0] * grid[1], -1)

    def _representation(self, model, ema_model, inp, out, targets, index, values, kw, metrics):
        if inp.video is None:
            return None
        T, h, w = inp.video.shape[1:4]
        n = T * h * w
        frames = inp.frames.to(inp.video.device)
        target = self.target_features(frames, (h, w))
        pred = self.projector(out["features"][self.l][:, :n])
        mask = inp.video_mask.flatten(1) if inp.video_mask is not None else None
        rep, cos = cosine_loss(pred, target, mask)
        metrics["cos"] = cos.detach()
        return rep
