"""AdamW with decay / no-decay parameter groups and the learning-rate schedule.

The schedule is a pure function of the step (`lr_at`), set on the optimizer before every
step, so resuming needs no scheduler state: the step counter is enough.
"""
from __future__ import annotations

import math

import torch
from torch import nn

_NO_DECAY_NAMES = ("embed", "norm", "pos_", "token")


def param_groups(modules: dict[str, nn.Module], weight_decay: float) -> list[dict]:
    """Split trainable parameters: no weight decay on norms, biases, embeddings and
    other vectors (decaying them only shrinks scales/offsets and hurts)."""
    decay, no_decay, seen = [], [], set()
    for prefix, module in modules.items():
        embedding_params = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lname = f"{prefix}.{name}".lower()
            if p.ndim < 2 or id(p) in embedding_params or any(k in lname for k in _NO_DECAY_NAMES):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(modules: dict[str, nn.Module], cfg, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(modules, float(cfg.get("weight_decay", 0.0)))
    if not groups:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    kwargs = dict(lr=float(cfg.lr), betas=tuple(float(b) for b in cfg.get("betas", (0.9, 0.999))),
                  eps=float(cfg.get("eps", 1e-8)))
    if device.type == "cuda":
        kwargs["fused"] = True  # one kernel for the whole update; CUDA only
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, cfg) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then constant or cosine to min_lr_ratio*lr."""
    base = float(cfg.lr)
    warmup = int(cfg.get("warmup_steps", 0))
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if cfg.get("schedule", "constant") == "cosine":
        total = max(int(cfg.steps) - warmup, 1)
        progress = min(max(step - warmup, 0) / total, 1.0)
        floor = float(cfg.get("min_lr_ratio", 0.0))
        return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return base


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
