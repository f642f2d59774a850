"""Rectified flow (paper convention): x_t = (1 - t) x0 + t noise, t = 1 is noise, v = noise - x0."""
from __future__ import annotations

import torch


def shift_time(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Timeshift s(alpha, t) = alpha t / (1 + (alpha - 1) t); alpha > 1 moves mass toward noise."""
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


def sample_time(n: int, dist: str = "uniform", shift: float = 1.0, mu: float = 0.0, sigma: float = 1.0,
                device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw n timesteps from p(t): uniform or logit-normal(mu, sigma), then shifted by alpha."""
    if dist == "uniform":
        t = torch.rand(n, device=device, generator=generator)
    elif dist == "logit_normal":
        t = torch.sigmoid(mu + sigma * torch.randn(n, device=device, generator=generator))
    else:
        raise ValueError(f"unknown timestep distribution {dist!r}; use uniform or logit_normal")
    return shift_time(t, shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t broadcastable against x0 from the left ([B], or per token [B, *tokens])."""
    t = t.reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def masked_mse(pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared errors over valid tokens (mean over the token's channels) and the token count."""
    err = (pred.float() - target.float()).pow(2).mean(-1)
    if token_mask is None:
        return err.sum(), torch.tensor(float(err.numel()), device=err.device)
    m = token_mask.to(err.dtype).expand_as(err)
    return (err * m).sum(), m.sum()
