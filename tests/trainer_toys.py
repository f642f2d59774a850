"""Toy model / objective / data for the trainer tests (the real ones are built elsewhere)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

D_IN = 8


class ToyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, h):
        return h + F.gelu(self.fc(self.norm(h)))


class ToyModel(nn.Module):
    """embed -> blocks -> norm -> head, with a time embedding and a buffer (like a DiT)."""

    def __init__(self, d: int = 16, depth: int = 2):
        super().__init__()
        self.x_embed = nn.Linear(D_IN, d)
        self.t_embed = nn.Embedding(10, d)
        self.blocks = nn.ModuleList([ToyBlock(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, D_IN)
        self.aux = nn.Linear(d, D_IN)  # never used: DDP must cope with parameters without gradients
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x, t):
        h = self.x_embed(x) + self.t_embed((t.squeeze(-1) * 9).long())
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)) * self.scale


class ToyObjective(nn.Module):
    """Flow matching plus a 'representation' loss against the EMA teacher through a trained
    projection head. random=True draws noise and t from the global RNG (tests RNG restore);
    random=False derives them from the data (identical across process counts)."""

    def __init__(self, random: bool = True, nan_at_calls: tuple[int, ...] = (), fail_at_call: int | None = None,
                 grad_nan_at_calls: tuple[int, ...] = ()):
        super().__init__()
        self.proj = nn.Linear(D_IN, D_IN)
        self.random = random
        self.nan_at_calls, self.fail_at_call, self.calls = set(nan_at_calls), fail_at_call, 0
        self.grad_nan_at_calls = set(grad_nan_at_calls)

    def forward(self, model, ema_model, batch):
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        x = batch["x"]
        if self.random:
            noise, t = torch.randn_like(x), torch.rand(x.shape[0], 1)
        else:
            noise, t = torch.sin(3 * x + 1), (x[:, :1].abs() * 7) % 1
        xt = (1 - t) * x + t * noise
        v = model(xt, t)
        flow = F.mse_loss(v, noise - x)
        if not self.random:  # a second student forward in the same step (action-only samples do this)
            flow = flow + 0.5 * F.mse_loss(model(x, torch.zeros_like(t)), torch.zeros_like(x))
        with torch.no_grad():
            teacher = ema_model(xt, t)
        rep = F.mse_loss(self.proj(v), teacher)
        loss = flow + 0.1 * rep
        if self.calls in self.nan_at_calls:
            loss = loss * float("nan")
        if self.calls in self.grad_nan_at_calls:  # finite loss, non-finite gradient (d sqrt(x)/dx at 0)
            loss = loss + torch.sqrt((v * 0).sum())
        return loss, {"flow": flow.detach(), "rep": rep.item()}


class ToyData(Dataset):
    def __init__(self, n: int = 20):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, D_IN, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "index": i}


def tiny_cfg(**overrides) -> dict:
    cfg = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, schedule="cosine", checkpoint_every=4,
               keep_last=0, log_every=1, num_workers=0, device="cpu", precision="fp32", seed=0,
               measure_mfu=False, ema_decay=0.9)
    cfg.update(overrides)
    return cfg


LOGGER = dict(wandb="disabled", progress_bar=False, curves=False)  # curves: tests/test_curves.py
