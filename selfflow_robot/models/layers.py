"""Transformer pieces in the DiT/SiT tradition, with per-token adaLN-Zero.

Per-token conditioning is computed per *distinct timestep*: a sample holds a few timestep
values (t and s under Dual-Timestep Scheduling, the context level, 0 for text), so the
modulation MLP runs on those K values and each token gathers its row. With K = 1 this is
exactly DiT's scalar path; with K = N it is the per-token path of the Self-Flow release.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def gather_tokens(per_slot: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    """[B, K, C] rows -> [B, N, C] per token; `select` is the one-hot [B, N, K] slot choice, None
    means one shared slot (plain broadcasting). Not torch.gather: its backward is a scatter-add
    with N-way atomic contention on K rows. Compiled, a sum of K masked terms fuses into the
    modulation kernels; eager, that sum is 2K - 1 passes over [B, N, C], so one batched matmul
    (backward: another matmul, a reduction over tokens) does it instead."""
    if select is None:
        return per_slot
    if not torch.compiler.is_compiling() and _one_hot_matmul_is_exact(per_slot):
        return torch.bmm(select.to(per_slot.dtype), per_slot)
    out = select[..., 0:1] * per_slot[:, 0:1]
    for k in range(1, per_slot.shape[1]):
        out = out + select[..., k:k + 1] * per_slot[:, k:k + 1]
    return out


def _one_hot_matmul_is_exact(t: torch.Tensor) -> bool:
    """A one-hot matmul copies rows exactly, unless fp32 CUDA matmuls round their inputs to TF32."""
    return t.device.type != "cuda" or t.dtype != torch.float32 or not torch.backends.cuda.matmul.allow_tf32


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (256 frequencies, max period 1e4) -> 2-layer SiLU MLP."""

    def __init__(self, width: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim
        half = freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[..., None] * self.freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Rope3D(nn.Module):
    """Rotary positions over (time, height, width); the head dim is split between the three axes."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        hw = 2 * (head_dim // 6)
        dims = (head_dim - 2 * hw, hw, hw)
        self.dims = dims
        for i, d in enumerate(dims):
            inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / max(d, 1))
            self.register_buffer(f"inv_freq{i}", inv, persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos [N, 3] float -> (cos, sin) each [N, head_dim / 2]."""
        angles = torch.cat([pos[:, i, None] * getattr(self, f"inv_freq{i}") for i in range(3)], dim=-1)
        return angles.cos(), angles.sin()


def sincos_2d(h: int, w: int, width: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [h, w, width] of the released SiT/Self-Flow network (MAE's
    formula, float64 then float32): the first half encodes the column, the second the row, each
    as [sin | cos] of the position times 1e4^(-k / (width / 4))."""
    def axis(pos: torch.Tensor, dim: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=device) / (dim / 2.0))
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    return torch.cat([axis(cols, width // 2), axis(rows, width // 2)], dim=1).float().view(h, w, width)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, heads, hd]; cos/sin [N, hd / 2]. Computed in x's dtype: an fp32 copy of q and k
    would double their memory traffic and saved activations under bf16 autocast."""
    cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        hd = width // heads
        self.q_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], n_prefix: int = 0,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, kv_out: list | None = None,
                kv_only: bool = False) -> torch.Tensor | None:
        """n_prefix > 0: the first n_prefix tokens (the conditioning) attend only among themselves,
        the rest attend to everything. past: cached prefix keys/values (x is then generated tokens
        only). kv_out: a list that receives this call's (k, v), to build such a cache; with kv_only
        nothing else is computed (the last block of a cache needs no output)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).unbind(2)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_out is not None:
            kv_out.append((k, v))
            if kv_only:
                return None
        if past is not None:
            k, v = torch.cat([past[0].to(k.dtype), k], dim=2), torch.cat([past[1].to(v.dtype), v], dim=2)
            y = F.scaled_dot_product_attention(q, k, v)
        elif 0 < n_prefix < N:  # two unmasked calls keep the fused (flash) kernels
            P = n_prefix
            y = torch.cat([F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P]),
                           F.scaled_dot_product_attention(q[:, :, P:], k, v)], dim=2)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """DiT block with adaLN-Zero; the conditioning arrives as K slot vectors plus a token index."""

    # Methods that read the block's weights outside forward; FSDP2 gathers them for these too.
    FSDP_FORWARD_METHODS = ("modulation",)

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """The adaLN output for conditioning vectors (sampling computes a whole schedule ahead)."""
        return self.adaLN_modulation(cond)

    def forward(self, x, cond_slots, select, rope, n_prefix: int = 0, past=None, kv_out=None, mod=None,
                kv_only: bool = False):
        """mod: this block's adaLN output computed ahead (sampling precomputes the whole schedule).
        kv_only: only append this block's keys/values to kv_out; x is returned unchanged."""
        if mod is None:
            mod = gather_tokens(self.adaLN_modulation(cond_slots), select)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        if kv_only:
            self.attn(modulate(self.norm1(x), shift1, scale1), rope, kv_out=kv_out, kv_only=True)
            return x
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope, n_prefix, past, kv_out)
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) per token, then a linear head to the stream's token size."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, cond_slots, select, mod=None):
        if mod is None:
            mod = gather_tokens(self.adaLN_modulation(cond_slots), select)
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))
