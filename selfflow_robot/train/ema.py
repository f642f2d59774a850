"""EMA of the model weights (the Self-Flow teacher and the weights that get exported)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .distributed import _local


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen fp32 copy of `model` in eval mode (initialised to the step-0 weights)."""
    ema = copy.deepcopy(model).float().eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters; buffers are copied.

    FSDP2 parameters are DTensors sharded alike on both sides: the update is shard-local."""
    for m in ema.modules():
        # FSDP2 leaves a no-grad forward's root (and keep-gathered) parameters unsharded;
        # reshard so both sides are the same local shards.
        if hasattr(m, "reshard") and hasattr(m, "unshard"):
            m.reshard()
    ema_p = [_local(p) for p in ema.parameters()]
    model_p = list(model.parameters())
    if len(ema_p) != len(model_p):
        raise RuntimeError("EMA and model have different parameter lists")
    src_p = [_local(p).detach().to(e.dtype) for p, e in zip(model_p, ema_p)]
    if ema_p:
        torch._foreach_lerp_(ema_p, src_p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        # Running statistics etc. are copied, not averaged (as in timm's ModelEmaV3).
        b_ema.copy_(b)
