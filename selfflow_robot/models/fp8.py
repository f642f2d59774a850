"""FP8 (e4m3) matmuls for the no-grad Self-Flow teacher.

The teacher's forward through blocks 1..k is about a fifth of a Self-Flow step's FLOPs, and all
of it is inference: no gradients, an output used only as a cosine target. On GPUs with FP8 tensor
cores (compute capability >= 8.9: H100, H200, L40, RTX 4090) `torch._scaled_mm` runs those matmuls
at up to twice the bf16 rate. Scales are per output channel for the weights and per token for
the activations (row-wise), which keeps the teacher's features within ~1e-3 of 1 - cos of the
full-precision ones (tests/test_fp8.py).

`Fp8Linear` keeps the nn.Linear's own parameters, so state-dict keys, the EMA update and the
exported weights are unchanged; FP8 is used only inside `fp8_matmuls(model)`, and the FP8 copy of
a weight is refreshed there whenever the EMA update has changed it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
TEACHER_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 values, fp32 scale [M, 1]) with x ~= values * scale, row by row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


class Fp8Linear(nn.Linear):
    """An nn.Linear that multiplies in FP8 while `fp8` is set (see `fp8_matmuls`)."""

    fp8 = False

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameter objects
        # Plain attributes, not buffers: the EMA update pairs buffers with the student's. They are
        # refreshed in place, so compiled graphs that captured them stay valid.
        new.weight_fp8 = torch.empty_like(linear.weight, dtype=E4M3)
        new.weight_scale = torch.empty(1, linear.out_features, device=linear.weight.device)
        new._quantized_version = -1
        return new

    @torch.no_grad()
    def refresh(self) -> None:
        """Requantise the weight if it changed since the last call (EMA update, checkpoint load)."""
        if self.weight._version == self._quantized_version and self.weight_fp8.device == self.weight.device:
            return
        if self.weight_fp8.device != self.weight.device:
            self.weight_fp8 = self.weight_fp8.to(self.weight.device)
            self.weight_scale = self.weight_scale.to(self.weight.device)
        q, scale = quantize_rows(self.weight)
        self.weight_fp8.copy_(q)
        self.weight_scale.copy_(scale.view(1, -1))
        self._quantized_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return super().forward(x)
        lead = x.shape[:-1]
        xq, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        # CUDA's row-wise kernel writes bf16; weight_fp8 [N, K] row-major is the column-major
        # [K, N] operand it expects. The bias is added outside (fused by compile).
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*lead, self.out_features)


def cpu_has_scaled_mm() -> bool:
    """Whether this torch's CPU torch._scaled_mm takes row-wise scales, as Fp8Linear calls it
    (torch 2.7 has no CPU kernel, 2.10's takes one scale per tensor only)."""
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def use_fp8_teacher(model: nn.Module, blocks: int) -> int:
    """Swap the matmul Linears of model.blocks[:blocks] for Fp8Linear (sharing their parameters).
    Returns how many were swapped; layers whose sizes are not multiples of 16 (an FP8 kernel
    requirement) stay as they are."""
    weight = next(model.parameters())
    if weight.is_cuda and torch.cuda.get_device_capability(weight.device) < (8, 9):
        name = torch.cuda.get_device_name(weight.device)
        raise ValueError(f"objective.teacher_fp8 needs FP8 tensor cores (compute capability >= 8.9, e.g. H100); "
                         f"{name} has {torch.cuda.get_device_capability(weight.device)}")
    if weight.device.type == "cpu" and not cpu_has_scaled_mm():
        raise ValueError(f"objective.teacher_fp8 on CPU needs a row-wise CPU torch._scaled_mm, which torch "
                         f"{torch.__version__} lacks (torch 2.13 has it); set objective.teacher_fp8=false")
    swapped = 0
    for block in list(model.blocks)[:blocks]:
        for path in TEACHER_LINEARS:
            parent_name, _, child = path.rpartition(".")
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, child)
            if type(linear) is nn.Linear and linear.in_features % 16 == 0 and linear.out_features % 16 == 0:
                setattr(parent, child, Fp8Linear.from_linear(linear))  # same slot: parameter order kept
                swapped += 1
    return swapped


@contextmanager
def fp8_matmuls(model: nn.Module):
    """Run `model`'s Fp8Linear layers in FP8 inside the block (no-op for a model without them)."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    for m in layers:
        m.refresh()
        m.fp8 = True
    try:
        yield
    finally:
        for m in layers:
            m.fp8 = False
