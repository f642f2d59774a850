"""Throughput accounting: achieved TFLOP/s and MFU (anchors.md §5.1).

FLOPs come from the model or objective, never from 6*N*T (that overcounts adaLN by ~1.45x):
- `objective.flops_per_sample(batch)`: total training FLOPs per sample (teacher included);
- else `model.flops_per_sample(batch)`: forward FLOPs per sample, times 3 for fwd + bwd.
The peak is measured (a large bf16 matmul), not taken from a spec sheet.
"""
from __future__ import annotations

import time
from functools import lru_cache

import torch


def training_flops_per_sample(model, objective, batch) -> float | None:
    for owner, factor in ((objective, 1.0), (model, 3.0)):
        fn = getattr(owner, "flops_per_sample", None)
        if callable(fn):
            try:
                value = fn(batch)
            except TypeError:
                value = fn()
            if value:
                return float(value) * factor
    return None


@lru_cache(maxsize=None)
def measure_matmul_peak(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                        iters: int = 20) -> float:
    """Sustained dense-matmul FLOP/s on `device` (the MFU denominator)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        dtype, n, iters = torch.float32, 1024, 5
    g = torch.Generator(dev).manual_seed(0)  # never touch the global RNG (exact resume)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(dev)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
