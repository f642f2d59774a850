"""Process-group setup from the torchrun environment and model parallelisation.

`parallelize` follows torchtitan's order (activation checkpointing -> compile -> FSDP): every
transformer block is compiled on its own (short compile times, clean state-dict keys because
`nn.Module.compile` works in place) and, with FSDP2, sharded on its own before the root.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

try:  # public path from torch 2.6
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
except ImportError:  # torch 2.4 / 2.5
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto") -> torch.device:
    """A device from a config value (auto, cpu, cuda, cuda:N, mps), or a ValueError saying why it
    cannot be used on this machine (before anything is loaded onto it)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(name))
    except RuntimeError:
        raise ValueError(f"device={name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device={name}: {why} (torch {torch.__version__}); use device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name}: MPS is not available here; use device=cpu")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    # Under torchrun a process group is made even for one process, so FSDP2 runs there too.
    if world <= 1 and not os.environ.get("TORCHELASTIC_RUN_ID"):
        return DistInfo(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def agree_on_path(path, info: DistInfo):
    """Rank 0's path on every rank. Each torchrun process composes its own config, and a run
    directory named after the start time can differ by a second between ranks."""
    if not info.distributed:
        return path
    data = torch.zeros(4096, dtype=torch.uint8, device=info.device)
    if info.is_main:
        raw = str(path).encode()
        if len(raw) > data.numel():
            raise ValueError(f"run directory path longer than {data.numel()} bytes: {path}")
        data[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    raw = bytes(data.cpu().tolist()).rstrip(b"\0")
    return type(path)(raw.decode())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resolve_parallel(mode: str, info: DistInfo) -> str:
    if mode in (None, "auto"):
        return "ddp" if info.distributed else "none"
    if mode not in ("none", "ddp", "fsdp"):
        raise ValueError(f"trainer.parallel must be auto|none|ddp|fsdp, got {mode!r}")
    if mode in ("ddp", "fsdp") and not dist.is_initialized():
        # one process outside torchrun: nothing to synchronise. Under torchrun both wrap even a
        # 1-process group, so `torchrun --nproc_per_node 1` runs the multi-GPU code path on one GPU.
        warnings.warn(f"trainer.parallel={mode} outside torchrun: training in one process without it "
                      "(torchrun --nproc_per_node N -m ... starts the processes)", stacklevel=3)
        return "none"
    if mode == "none" and info.distributed:
        raise ValueError("parallel=none under torchrun with WORLD_SIZE>1 would train diverging replicas")
    return mode


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the first ModuleList named blocks/layers (DiT, SiT, ...)."""
    for name in ("blocks", "layers", "transformer_blocks"):
        found = getattr(model, name, None)
        if isinstance(found, nn.ModuleList):
            return list(found)
    for module in model.modules():
        if module is not model and hasattr(module, "blocks") and isinstance(module.blocks, nn.ModuleList):
            return list(module.blocks)
    return []


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Keep only each block's input and recompute its activations in backward (torchtitan's "full"
    activation checkpointing): about one more block forward per step for a fraction of the memory.
    The forward is wrapped in place, so state-dict keys and the EMA copy are untouched; without
    grad (teacher, validation, sampling) the block runs as usual. Returns how many blocks."""
    from torch.utils.checkpoint import checkpoint

    blocks = repeated_blocks(model)
    for block in blocks:
        def forward(*args, _forward=block.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


# All blocks share one compiled-code cache (one forward code object), filled by every variant a
# run meets: student with grad, no-grad teacher and validation, a last partial batch, prefix
# encoding and sampling at evaluation. Dynamo's default of 8 entries ran the later ones eagerly.
BLOCK_RECOMPILE_LIMIT = 64


def apply_compile(model: nn.Module) -> None:
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    blocks = repeated_blocks(model)
    for block in blocks or [model]:
        block.compile()  # in place: no `_orig_mod.` in state-dict keys


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None, training: bool = True) -> nn.Module:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = repeated_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward: keep them gathered
        # (training only; the EMA teacher has no backward).
        fully_shard(block, mp_policy=mp, reshard_after_forward=not training or i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp)
    for module in (*blocks, model):
        for name in getattr(module, "FSDP_FORWARD_METHODS", ()):
            register_fsdp_forward_method(module, name)
    return model


class ObjectiveStep(nn.Module):
    """One training forward: the objective applied to the student (and the EMA teacher).

    DDP reduces gradients once per call of the module it wraps, and an objective may call the model
    more than once per step (joint samples, then action-only ones). So DDP wraps this step, not the
    model. The objective is held in a tuple, so its own parameters (a projection head) are not
    registered here. They stay outside DDP, and `all_reduce_grads` averages them."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self._objective = (objective,)

    def forward(self, ema_model, batch):
        return self._objective[0](self.model, ema_model, batch)


def parallelize(model: nn.Module, ema: nn.Module, mode: str, info: DistInfo, compile: bool,
                param_dtype: torch.dtype | None, find_unused: bool = True,
                activation_checkpointing: bool = False, objective=None) -> tuple[nn.Module, nn.Module]:
    """Returns (the step module, `loss, metrics = step(ema, batch)`; the EMA module).

    `model` itself stays the bare module (FSDP2 shards in place, DDP wraps the step), so state-dict
    keys never carry `module.` prefixes, and objectives see the model's own attributes.
    """
    if activation_checkpointing and not apply_activation_checkpointing(model):
        raise ValueError("trainer.activation_checkpointing: the model has no blocks/layers ModuleList to checkpoint")
    if compile:
        apply_compile(model)
        apply_compile(ema)
    step = ObjectiveStep(model, objective)
    if mode == "fsdp":
        apply_fsdp(model, param_dtype)
        apply_fsdp(ema, param_dtype, training=False)  # same sharding as the student: EMA update is shard-local
        return step, ema
    if mode == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        # find_unused_parameters: objectives skip parts of the model in some steps (action-only
        # samples, absent conditioning); the graph walk it adds is cheap next to a DiT step.
        return nn.parallel.DistributedDataParallel(step, device_ids=ids, find_unused_parameters=find_unused), ema
    return step, ema


@torch.no_grad()
def all_reduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients of parameters outside DDP/FSDP (an objective's projection head).
    A parameter without a gradient on this rank contributes zeros, so every rank sends the
    same layout even when ranks used different parts of the objective."""
    if world_size <= 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, world_size: int) -> torch.Tensor:
    """Global L2 gradient norm (DTensor shards summed over ranks), then clip in place.

    Works for a mix of sharded (FSDP2) and replicated gradients with a single all-reduce.
    Returns the norm before clipping (non-finite if any gradient is)."""
    sharded = [_local(p.grad) for p in params if p.grad is not None and hasattr(p.grad, "to_local")]
    plain = [p.grad for p in params if p.grad is not None and not hasattr(p.grad, "to_local")]
    if not sharded and not plain:
        return torch.zeros(())
    device = (sharded or plain)[0].device
    total_sq = torch.zeros((), device=device, dtype=torch.float32)
    if sharded:
        total_sq = total_sq + torch.stack([n.float() for n in torch._foreach_norm(sharded)]).square().sum()
        if world_size > 1:
            dist.all_reduce(total_sq)
    if plain:
        total_sq = total_sq + torch.stack([n.float() for n in torch._foreach_norm(plain)]).square().sum()
    norm = total_sq.sqrt()
    if max_norm and max_norm > 0:
        # clamp keeps this sync-free; a non-finite norm gives a non-finite coefficient and the
        # trainer skips or stops on it before optimizer.step.
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = sharded + plain
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm
