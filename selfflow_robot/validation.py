"""Validation metrics on held-out episodes: flow loss at fixed noise, and action error of sampled chunks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .objectives.self_flow import ObjectiveConfig, SelfFlowObjective
from .sampling import euler_sample


def split_episodes(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, validation) episode indices; at least one validation episode when n > 1."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_val = min(n - 1, max(1, round(n * fraction))) if n > 1 and fraction > 0 else 0
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def global_means(totals: dict[str, list[float]], device=None) -> dict[str, float]:
    """Each metric's mean over every rank's batches. Under torchrun each rank validates its own share
    of the held-out clips; reporting rank 0's share alone would depend on the number of ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {k: sum(v) / len(v) for k, v in totals.items()}
    keys = sorted(totals)  # every rank has the same metrics (same data fields, same model)
    sums = torch.tensor([[sum(totals[k]), len(totals[k])] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return {k: float(total / count) for k, (total, count) in zip(keys, sums.tolist())}


class Validator:
    """Deterministic metrics: the same batches and the same noise at every evaluation."""

    def __init__(self, loader, batches: int, model_cfg, context_noise_max: float, sampler_steps: int = 10,
                 seed: int = 1234):
        self.batches = [b for _, b in zip(range(batches), loader)]
        self.flow = SelfFlowObjective(ObjectiveConfig(kind="flow_matching", context_noise_max=context_noise_max), model_cfg)
        self.sampler_steps, self.seed = sampler_steps, seed
        self.last: tuple[int | None, dict] | None = None  # (step, metrics) of the latest pass

    @torch.no_grad()
    def __call__(self, model, step: int | None = None) -> dict[str, float]:
        if not self.batches:
            return {}
        was_training = model.training
        model.eval()
        totals: dict[str, list[float]] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for batch in self.batches:
                _, m = self.flow(model, None, batch)
                totals.setdefault("val_flow_loss", []).append(float(m["loss"]))
                if model.action_head is not None and batch.get("actions") is not None and batch["actions"].shape[-1] > 0:
                    totals.setdefault("val_action_mse", []).append(self._action_mse(model, batch))
        model.train(was_training)
        result = global_means(totals, model.type_embed.device)
        self.last = (step, result)
        return result

    def _action_mse(self, model, batch) -> float:
        """Action-first sampling (no video tokens), MSE in normalised action space over valid steps."""
        dev = model.type_embed.device
        ctx = model.frames_to_tokens(batch["context"].to(dev))
        text = model.encode_text(list(batch["instruction"]), dev) if model.cfg.text == "bytes" else None
        emb = batch["instruction_embedding"].to(dev) if model.cfg.text == "embedding" else None
        state = batch["state"].to(dev) if model.state_embed is not None and "state" in batch else None
        target = batch["actions"].to(dev).float()
        g = torch.Generator(dev).manual_seed(self.seed)
        out = euler_sample(model, steps=self.sampler_steps, context=ctx, text=text, text_emb=emb, state=state,
                           action_shape=tuple(target.shape), generator=g)
        err = (out["action"] - target).pow(2).mean(-1)
        mask = batch["action_mask"].to(dev).float() if "action_mask" in batch else torch.ones_like(err)
        return float((err * mask).sum() / mask.sum().clamp_min(1))
