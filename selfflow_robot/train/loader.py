"""Deterministic, resumable data loading.

`make_loader` shuffles with a permutation that depends only on (seed, epoch), shards it
over torchrun ranks like DistributedSampler (rank r takes every world_size-th index, so
the global batch of a step is the same for any number of ranks), and can start mid-epoch
without reading the skipped samples: the trainer calls `sampler.set_position(epoch, batches)`.
"""
from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """`group`: per-rank batches per optimizer step (gradient accumulation). With drop_last an epoch
    holds whole steps only, so accumulated micro-batches are exactly the samples of one big batch."""

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, batch_size: int = 1, group: int = 1):
        self.n, self.rank, self.world, self.seed = dataset_len, rank, world_size, seed
        self.shuffle, self.drop_last, self.batch_size, self.group = shuffle, drop_last, batch_size, group
        self.epoch, self.start = 0, 0
        if drop_last:
            per_rank, step = dataset_len // world_size, batch_size * group
            self.num_samples = per_rank - per_rank % step
        else:
            self.num_samples = math.ceil(dataset_len / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def set_position(self, epoch: int, batches: int) -> None:
        """Start `epoch` after `batches` per-rank batches (resume)."""
        self.epoch, self.start = epoch, batches * self.batch_size

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.world
        if len(order) < total:  # pad by wrapping, as DistributedSampler does
            order += order[: total - len(order)]
        mine = order[:total][self.rank::self.world]
        return iter(mine[self.start:])


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                drop_last: bool = True, collate_fn=None, pin_memory: bool | None = None, grad_accum_steps: int = 1,
                **kwargs) -> DataLoader:
    """DataLoader for the trainer. `batch_size` is the GLOBAL batch of one optimizer step; each
    torchrun rank loads it in `grad_accum_steps` micro-batches of batch_size / (WORLD_SIZE * steps)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    accum = int(grad_accum_steps)
    if accum < 1 or batch_size % (world * accum):
        raise ValueError(f"trainer.batch_size={batch_size} must be divisible by WORLD_SIZE ({world}) x "
                         f"trainer.grad_accum_steps ({grad_accum_steps})")
    per_rank = batch_size // (world * accum)
    if len(dataset) < batch_size and drop_last:
        raise ValueError(f"dataset has {len(dataset)} samples, fewer than one global batch ({batch_size})")
    sampler = ResumableSampler(len(dataset), rank, world, seed, shuffle, drop_last, per_rank, accum)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    # A fixed generator: worker seeds never draw from (and so never perturb) the global RNG.
    generator = torch.Generator().manual_seed(seed + 7919 * rank)
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, collate_fn=collate_fn, pin_memory=pin_memory,
                      persistent_workers=False, generator=generator, **kwargs)
