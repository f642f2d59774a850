"""Frames <-> tokens. Stores carry uint8 [..., H, W, 3]; the model sees [-1, 1] patches."""
from __future__ import annotations

import torch
from einops import rearrange


def frames_to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B, T, H, W, C] -> float32 in [-1, 1]."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {frames.dtype}")
    return frames.float() / 127.5 - 1.0


def float_to_frames(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, T, H, W, C] -> [B, T, H/p, W/p, p*p*C]."""
    H, W = x.shape[2], x.shape[3]
    if H % p or W % p:
        raise ValueError(f"frame size {H}x{W} is not divisible by model.patch_size={p}")
    return rearrange(x, "b t (h p) (w q) c -> b t h w (p q c)", p=p, q=p)


def unpatchify(tokens: torch.Tensor, p: int) -> torch.Tensor:
    """[B, T, h, w, p*p*C] -> [B, T, h*p, w*p, C]."""
    return rearrange(tokens, "b t h w (p q c) -> b t (h p) (w q) c", p=p, q=p)
