"""Instruction encoders that need no download: UTF-8 bytes, or a precomputed embedding."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

PAD = 0  # byte b is token b + 1


def encode_bytes(texts: Sequence[str], max_len: int) -> torch.Tensor:
    """UTF-8 bytes -> LongTensor [B, max_len], truncated, padded with 0.

    Built in numpy: per-text torch calls cost ~5 dispatched ops each, per batch and per forward."""
    out = np.zeros((len(texts), max_len), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = np.frombuffer(str(text).encode("utf-8")[:max_len], dtype=np.uint8)
        out[i, : len(ids)] = ids.astype(np.int64) + 1
    return torch.from_numpy(out)


class ByteTextEncoder(nn.Module):
    """Byte embedding + learned positions. Pad tokens stay in the sequence as a learned embedding
    (no attention mask), which keeps attention on the fast fused kernels."""

    def __init__(self, width: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(257, width)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) + self.pos[: ids.shape[1]]


class EmbeddingTextEncoder(nn.Module):
    """A precomputed sentence embedding [B, E] (e.g. RT-1's 512-d USE vector) -> one token."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embed_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.proj(emb.float().to(self.proj[0].weight.dtype)).unsqueeze(1)
