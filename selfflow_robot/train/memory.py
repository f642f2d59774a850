"""Will a training run fit in memory? Estimated before its first step, so that a run too big for
the machine stops with one line saying what fits, instead of being killed by the OOM killer
(on a CPU machine that prints only "Killed", minutes in).

need = static + micro-batch x activations per sample x BACKWARD_FACTOR, where
- static: fp32 weights, gradients and AdamW's two moments of every trained parameter (16 bytes
  each) plus the EMA copy of the model (4 bytes each; it is also Self-Flow's teacher); the
  weights are already resident when the check runs, so counting them again is a small margin;
- activations per sample: the bytes autograd keeps for backward in one training forward of the
  real objective on one real sample (counted with saved-tensor hooks, so every objective, token
  count and precision is covered without a formula per model).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

# Backward holds the saved activations plus the gradients being formed and the allocator's slack.
# On the CPU (model s, RT-1 64x80 clips, fp32) the peak RSS grew by 0.82-0.84 of the estimate made
# with 1.25 (docs/training.md, "Memory"): room to spare without refusing runs that fit.
BACKWARD_FACTOR = 1.25
USABLE = 0.9  # of the memory available when the run starts (the loader, Python and the OS take the rest)
GiB = 2**30


class TooLarge(ValueError):
    """The run's estimated memory exceeds what the device has (one `error:` line at the command line)."""


def available_bytes(device: torch.device) -> int:
    """Free memory of a GPU, or the host's available memory (within a cgroup limit) on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 0  # unknown: the check is skipped
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = open(path).read().strip()
            used_path = path.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
            if limit.isdigit() and int(limit) < 2**60:
                avail = min(avail, int(limit) - int(open(used_path).read().strip()))
            break
        except (OSError, ValueError):
            continue
    return max(int(avail), 0)


def static_bytes(model: torch.nn.Module, objective) -> int:
    """Weights + gradients + AdamW moments (fp32) of what trains, and the model's EMA copy."""
    trained = [*model.parameters(), *(objective.parameters() if isinstance(objective, torch.nn.Module) else [])]
    n_trained = sum(p.numel() for p in trained if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in trained if not p.requires_grad)
    return 16 * n_trained + 4 * sum(p.numel() for p in model.parameters()) + frozen


def activation_bytes_per_sample(model, objective, sample_batch, step_context=None) -> int:
    """Bytes autograd saves for backward in one training forward of `objective` on a one-sample
    batch (one sample always takes the full joint pass: the largest). The RNG is left untouched,
    so a run with the check is the run without it."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    if isinstance(objective, torch.nn.Module):
        weights |= {p.untyped_storage().data_ptr() for p in objective.parameters()}
    seen: set[int] = set()
    total = [0]

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in weights and ptr not in seen:  # a weight (or a view saved twice) costs nothing new
            seen.add(ptr)
            total[0] += storage.nbytes()
        return t

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), (step_context or _null)():
            loss, _ = objective(model, model, sample_batch)  # the student as its own teacher: same shapes
        del loss
    return total[0]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@dataclass
class Estimate:
    static: int            # bytes per process
    per_sample: int        # activation bytes per sample (x BACKWARD_FACTOR)
    micro_batch: int       # samples per forward in each process
    processes: int         # processes sharing this memory (CPU ranks of one host)
    available: int
    device: str

    @property
    def need(self) -> int:
        return self.processes * (self.static + self.micro_batch * self.per_sample)

    @property
    def fits(self) -> bool:
        return self.available <= 0 or self.need <= USABLE * self.available

    def max_micro_batch(self) -> int:
        room = USABLE * self.available / self.processes - self.static
        return max(int(room // max(self.per_sample, 1)), 0)


def explain(est: Estimate, batch_size: int, accum: int, world: int, checkpointed: Estimate | None = None) -> str:
    """One line: what the run needs, what is there, and settings that fit (`checkpointed`: the
    same run's estimate with trainer.activation_checkpointing=true, when it is off)."""
    line = (f"trainer.batch_size={batch_size} needs ~{est.need / GiB:.1f} GiB of {est.device} memory "
            f"({est.static / GiB:.2f} GiB weights/gradients/AdamW/EMA + {est.per_sample / 2**20:.0f} MiB of "
            f"activations per sample x {est.micro_batch} per forward"
            + (f", x {est.processes} processes" if est.processes > 1 else "")
            + f"), but {est.available / GiB:.1f} GiB is available")
    m = est.max_micro_batch()
    if m < 1:
        if checkpointed is not None and checkpointed.fits:
            return line + "; fits: trainer.activation_checkpointing=true (docs/training.md, 'Memory')"
        return (line + "; not even one sample fits: use a smaller model (model=tiny), smaller frames "
                "(clip.image_size) or fewer frames (clip.future_frames), or another machine")
    fixes = []
    accum_fit = next((a for a in range(accum, batch_size // world + 1)
                      if batch_size % (a * world) == 0 and batch_size // (a * world) <= m), None)
    if accum_fit is not None:
        fixes.append(f"trainer.grad_accum_steps={accum_fit} (the same batch in micro-batches of "
                     f"{batch_size // (accum_fit * world)})")
    fixes.append(f"trainer.batch_size={m * accum * world}")
    if checkpointed is not None and checkpointed.fits:
        fixes.append("trainer.activation_checkpointing=true")
    return (line + f"; fits: {' or '.join(fixes)} (docs/training.md, 'Memory'; "
            "trainer.memory_check=false runs it anyway)")


def _checkpointed_bytes(model, objective, sample_batch, step_context, full: int) -> int:
    """With trainer.activation_checkpointing: what the wrapped blocks keep, plus one block
    rebuilt at a time in backward with its activation gradients and the recompute's temporaries
    (three times one block's share, from the peak measured on the CPU). The wrapping is undone
    afterwards (the trainer applies its own)."""
    from .distributed import apply_activation_checkpointing, repeated_blocks

    blocks = repeated_blocks(model)
    before = [b.__dict__.get("forward") for b in blocks]
    apply_activation_checkpointing(model)
    try:
        kept = activation_bytes_per_sample(model, objective, sample_batch, step_context)
    finally:
        for block, fwd in zip(blocks, before):
            if fwd is None:
                del block.forward
            else:
                block.forward = fwd
    return kept + 3 * full // max(len(blocks), 1)


def estimate(model, objective, sample_batch, *, batch_size: int, accum: int, world: int, device: torch.device,
             parallel: str = "none", checkpointing: bool = False, step_context=None) -> Estimate:
    static = static_bytes(model, objective)
    if parallel == "fsdp":  # parameters, gradients and optimizer state are sharded over the ranks
        static = math.ceil(static / world)
    saved = activation_bytes_per_sample(model, objective, sample_batch, step_context)
    if checkpointing:
        saved = _checkpointed_bytes(model, objective, sample_batch, step_context, saved)
    per_sample = math.ceil(saved * BACKWARD_FACTOR)
    micro = max(batch_size // max(accum * world, 1), 1)
    # CPU ranks share the host's memory; GPUs each have their own
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if device.type == "cpu" else 1
    return Estimate(static, per_sample, micro, max(local, 1), available_bytes(device), device.type)
