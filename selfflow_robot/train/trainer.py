"""The training loop: single process, or torchrun with DDP / FSDP2.

One step: batch -> objective(student, ema, batch) under autocast -> backward -> (sync
objective grads) -> global grad-norm clip -> finite check -> AdamW -> EMA lerp. Rank 0 logs
and writes checkpoints; every rank takes part in the collectives (FSDP state gathering).
Resume restores weights, EMA, optimizer, step, every RNG and the data position, so the
loss sequence continues exactly as in an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from . import checkpoint as ckpt
from .distributed import (DistInfo, all_reduce_grads, barrier, clip_grad_norm, init_distributed, parallelize,
                          resolve_parallel)
from .ema import ema_update, make_ema
from .flops import measure_matmul_peak, training_flops_per_sample
from .loader import ResumableSampler
from .logging import RunLogger, Throughput, to_float
from .optim import build_optimizer, lr_at, set_lr

# Defaults = configs/trainer/default.yaml; a partial cfg (tests, scripts) is merged over them.
DEFAULTS: dict[str, Any] = dict(
    steps=1000, batch_size=256, lr=1e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0,
    warmup_steps=0, schedule="constant", min_lr_ratio=0.0, grad_clip=1.0, ema_decay=0.9999, ema_every=1,
    precision="auto", compile=False, parallel="auto", device="auto", checkpoint_every=1000, keep_last=3,
    log_every=50, eval_every=0, num_workers=4, seed=0, on_nan="raise", max_nan_skips=10, resume=False,
    measure_mfu=True, ddp_find_unused_parameters=True, attention="auto", grad_accum_steps=1,
    activation_checkpointing=False, memory_check=True,
)
# trainer.attention: which fused attention kernel SDPA may use (auto = PyTorch's own choice).
ATTENTION_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                      "math": "MATH"}
LOGGER_DEFAULTS: dict[str, Any] = dict(jsonl=True, wandb="auto", project="selfflow-robot", entity=None, name=None,
                                       tags=[], progress_bar=True, init_timeout=60, curves=True)


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient with on_nan=raise (or too many skips)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_cfg(cfg, defaults: dict, section: str = "trainer") -> DictConfig:
    cfg = OmegaConf.create({} if cfg is None else (OmegaConf.to_container(cfg, resolve=True)
                                                   if isinstance(cfg, DictConfig) else dict(cfg)))
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:  # e.g. +trainer.stepz=3 would otherwise train with the default steps
        import difflib

        hint = difflib.get_close_matches(unknown[0], list(defaults), n=1)
        raise ValueError(f"unknown {section} key '{unknown[0]}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                         + f"; {section} keys: {', '.join(sorted(defaults))}")
    merged = OmegaConf.merge(OmegaConf.create(defaults), cfg)
    for key, default in defaults.items():  # trainer.batch_size=abc: name the key, not int()'s complaint
        value = merged[key]
        kind = type(default)
        if kind in (int, float) and value is not None and not isinstance(value, bool):
            try:
                kind(value)
                continue
            except (TypeError, ValueError):
                pass
            raise ValueError(f"{section}.{key} must be a number, got {value!r}")
    return merged


def check_config(cfg) -> DictConfig:
    """The trainer section with its defaults, refused early (before data loading) when a key is
    unknown or a number is not one."""
    return _as_cfg(cfg, DEFAULTS)


def _warn_short_run(c) -> None:
    """Settings sized for long runs silently waste a short one: say so before it starts."""
    steps, updates = int(c.steps), int(c.steps) // max(int(c.ema_every), 1)
    if int(c.warmup_steps) >= steps:
        warnings.warn(f"trainer.warmup_steps={c.warmup_steps} >= trainer.steps={steps}: the learning rate never "
                      f"reaches trainer.lr={c.lr}; set e.g. trainer.warmup_steps={max(1, steps // 20)}", stacklevel=3)
    init_share = float(c.ema_decay) ** updates
    if init_share > 0.1:  # the saved (EMA) weights would still be mostly the initialisation
        suggested = max(round(1 - 5 / max(updates, 1), 4), 0.0)  # keeps e^-5 < 1% of the initialisation
        warnings.warn(f"trainer.ema_decay={c.ema_decay} over {updates} EMA updates keeps {init_share:.0%} of the "
                      f"initial weights in the saved EMA model (the checkpoint and validation use it); for a run "
                      f"this short set e.g. trainer.ema_decay={suggested:g}", stacklevel=3)


def move_to_device(batch, device: torch.device):
    """Tensors anywhere in nested dicts / lists / tuples go to `device` (non_blocking)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _config_diff(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _config_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}={b!r} (run: {a!r})"]


def _mean_metric(v):
    return v.detach().float().mean() if isinstance(v, torch.Tensor) else float(v)


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = _batch_size(v)
            if n:
                return n
    return 0


class _TrainModule(nn.Module):
    """Everything the optimizer updates, under stable names (model.*, objective.*)."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        if isinstance(objective, nn.Module):
            self.objective = objective


class Trainer:
    def __init__(self, cfg, model: nn.Module, objective: Callable, data: Iterable, run_dir: str | Path,
                 config: dict | None = None, extra_files: dict[str, dict] | None = None,
                 batch_to_device: Callable | None = None, eval_fn: Callable | None = None, eval_every: int = 0,
                 logger_cfg=None, resume: bool | str | None = None):
        if cfg is not None and "trainer" in cfg and "steps" not in cfg:  # the whole run config was passed
            logger_cfg = logger_cfg if logger_cfg is not None else cfg.get("logger")
            cfg = cfg["trainer"]
        if logger_cfg is None and cfg is not None and "logger" in cfg:
            logger_cfg = cfg["logger"]
        self.cfg = _as_cfg(cfg, DEFAULTS)
        self.logger_cfg = _as_cfg(logger_cfg, LOGGER_DEFAULTS, "logger")
        c = self.cfg
        if c.on_nan not in ("raise", "skip"):
            raise ValueError(f"trainer.on_nan must be raise|skip, got {c.on_nan!r}")
        _warn_short_run(c)
        self.run_dir = Path(run_dir)
        self.config = config if config is not None else {"trainer": OmegaConf.to_container(c)}
        self.extra_files = dict(extra_files or {})
        self.eval_fn, self.eval_every = eval_fn, int(eval_every or c.eval_every)
        self.data = data

        self.dist: DistInfo = init_distributed(c.device)
        self.device = self.dist.device
        precision = c.precision if c.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"trainer.precision must be auto|bf16|fp32, got {precision!r}")
        if precision == "bf16" and self.device.type == "cpu":
            warnings.warn("bf16 autocast on CPU is ~20x slower than fp32 (docs/machine-notes.md)", stacklevel=2)
        self.precision = precision
        if c.attention != "auto" and c.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"trainer.attention must be auto|{'|'.join(ATTENTION_BACKENDS)}, got {c.attention!r}")
        if c.attention == "cudnn" and self.device.type != "cuda":
            raise ValueError("trainer.attention=cudnn needs a CUDA device")
        self.accum = int(c.grad_accum_steps)
        sampler = getattr(data, "sampler", None)
        if self.accum < 1 or isinstance(sampler, ResumableSampler) and sampler.group != self.accum:
            raise ValueError(f"trainer.grad_accum_steps={c.grad_accum_steps} must be >= 1 and match the data "
                             f"loader's split: build it with make_loader(..., grad_accum_steps={c.grad_accum_steps})")
        self.batch_to_device = batch_to_device or (lambda b: move_to_device(b, self.device))
        self.parallel = resolve_parallel(c.parallel, self.dist)

        model.to(self.device)
        if isinstance(objective, nn.Module):
            objective.to(self.device)
        if self.dist.distributed:  # identical start on every rank (FSDP does not broadcast)
            for t in [*model.parameters(), *model.buffers(), *_module_tensors(objective)]:
                dist.broadcast(t.data, src=0)
        self.model = model  # bare student (sharded in place under FSDP; DDP wraps a view of it)
        self.ema_model = make_ema(model)
        if hasattr(objective, "prepare_teacher"):  # e.g. FP8 teacher matmuls
            objective.prepare_teacher(self.ema_model, self.parallel)
        self.objective = objective
        self.train_module = _TrainModule(model, objective)
        self.loss_module, self.ema_model = parallelize(
            model, self.ema_model, self.parallel, self.dist, bool(c.compile),
            torch.bfloat16 if precision == "bf16" else None, bool(c.ddp_find_unused_parameters),
            bool(c.activation_checkpointing), objective=objective)
        self.optimizer = build_optimizer(dict(self.train_module.named_children()), c, self.device)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.objective_params = [p for p in _module_params(objective) if p.requires_grad]

        seed_everything(int(c.seed) + self.dist.rank)  # per-rank noise streams
        self.step, self.epoch, self.batch_in_epoch, self.nan_skips = 0, 0, 0, 0
        self.wandb_id: str | None = None
        self.last_checkpoint: Path | None = None
        self._rng_to_restore: dict | None = None
        self._iter = None
        resume = c.resume if resume is None else resume
        if resume:
            found = ckpt.latest_checkpoint(self.run_dir if resume is True else resume)
            if found is not None:
                self.load_checkpoint(found)
                if self.dist.is_main:  # kills between a save and its prune must not pile up checkpoints
                    ckpt.prune(self.run_dir, int(c.keep_last or 0), keep=found)
            elif resume is not True:
                raise FileNotFoundError(f"resume={resume!r}: no checkpoint there")
            elif self.dist.is_main:
                print(f"[trainer] resume: no checkpoint in {self.run_dir}, starting from step 0")
        elif self.dist.is_main and ckpt.latest_checkpoint(self.run_dir) is not None:
            warnings.warn(f"{self.run_dir} already has checkpoints and resume is off: this run starts at step 0 "
                          f"and will overwrite them step by step (set resume=true to continue instead)",
                          stacklevel=2)

    # ------------------------------------------------------------------ data
    def _make_iter(self):
        sampler = getattr(self.data, "sampler", None)
        skip = self.batch_in_epoch
        if isinstance(sampler, ResumableSampler):
            sampler.set_position(self.epoch, self.batch_in_epoch)
            skip = 0
            gen = getattr(self.data, "generator", None)
            if isinstance(gen, torch.Generator):  # worker seeds depend only on (seed, epoch, rank)
                gen.manual_seed(sampler.seed * 1_000_003 + self.epoch * 7919 + sampler.rank)
        elif hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        # DataLoader iterators draw a worker base seed from the global RNG: keep that draw out
        # of the training RNG stream so resuming mid-epoch reproduces it exactly.
        with torch.random.fork_rng(devices=[]):
            it = iter(self.data)
            for _ in range(skip):  # generic iterables: replay to the saved position
                next(it)
        return it

    def _micro_batch(self) -> int | None:
        """Samples per loader batch on this rank (the unit of batch_in_epoch), when the loader says."""
        sampler = getattr(self.data, "sampler", None)
        return int(sampler.batch_size) if isinstance(sampler, ResumableSampler) else None

    def _resume_position(self, state: dict) -> int:
        """batch_in_epoch in this run's loader batches. It counts per-rank micro-batches, so a
        resume with other grad_accum_steps or ranks converts it through the samples consumed,
        which would otherwise replay or skip data."""
        batches, saved, now = int(state["batch_in_epoch"]), state.get("micro_batch"), self._micro_batch()
        world, saved_world = self.dist.world_size, int(state.get("world_size", 1))
        if saved is None or now is None or (saved, saved_world) == (now, world):
            return batches
        samples = batches * int(saved) * saved_world  # of this epoch, over all ranks
        converted, rest = divmod(samples, now * world)
        if rest and self.dist.is_main:
            warnings.warn(f"resuming with {now} x {world} samples per loader batch (saved: {saved} x {saved_world}): "
                          f"{samples} samples of this epoch were consumed, not a whole number of batches; "
                          f"{rest} are read again", stacklevel=3)
        return converted

    def _close_iter(self) -> None:
        it, self._iter = self._iter, None  # the next fit() reopens at (epoch, batch_in_epoch)
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()

    def _next_batch(self):
        if self._iter is None:
            self._iter = self._make_iter()
        for _ in range(2):
            try:
                batch = next(self._iter)
                self.batch_in_epoch += 1
                return batch
            except StopIteration:
                if self.batch_in_epoch == 0:
                    break
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._iter = self._make_iter()
        raise RuntimeError("the data iterable yielded no batches (dataset smaller than one batch?)")

    # ------------------------------------------------------------------ one step
    def _step_context(self):
        """bf16 autocast (or none) and, with trainer.attention set, that SDPA kernel only. Under
        torch.compile the kernel is picked while tracing, so the context must cover the first step."""
        stack = contextlib.ExitStack()
        if self.precision == "bf16":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self.cfg.attention != "auto":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(getattr(SDPBackend, ATTENTION_BACKENDS[self.cfg.attention])))
        return stack

    def _grad_sync(self, sync: bool):
        """Gradient accumulation: DDP / FSDP2 communicate only in the last micro-batch's backward."""
        if hasattr(self.loss_module, "no_sync"):  # DDP
            return contextlib.nullcontext() if sync else self.loss_module.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _train_step(self, *micro_batches) -> tuple[float, float, dict, bool]:
        """One optimizer step over one batch, or over several micro-batches whose gradients add up
        (trainer.grad_accum_steps): each loss is divided by their number, so the step equals one
        over their union for objectives that average over samples."""
        c = self.cfg
        set_lr(self.optimizer, lr_at(self.step, c))
        n, losses, rows = len(micro_batches), [], []
        for i, batch in enumerate(micro_batches):
            with self._grad_sync(i == n - 1):
                with self._step_context():
                    loss, metrics = self.loss_module(self.ema_model, batch)
                (loss / n).backward()
            losses.append(loss.detach())
            rows.append(metrics)
        if n > 1:
            loss = torch.stack(losses).mean()
            # a micro-batch may lack a term (no valid future frame, only given actions): each key is
            # the mean over the micro-batches that report it
            keys = dict.fromkeys(k for r in rows for k in r)
            metrics = {k: sum(_mean_metric(r[k]) for r in rows if k in r) / sum(k in r for r in rows) for k in keys}
        all_reduce_grads(self.objective_params, self.dist.world_size)
        grad_norm = clip_grad_norm(self.params, float(c.grad_clip or 0), self.dist.world_size)
        # One small tensor, one sync: global mean loss and the (already global) grad norm.
        stat = torch.stack([loss.detach().float().reshape(()), grad_norm.float().to(loss.device)])
        if self.dist.distributed:
            dist.all_reduce(stat)
            stat /= self.dist.world_size
        loss_v, gn_v = stat.tolist()
        finite = math.isfinite(loss_v) and math.isfinite(gn_v)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite and (self.step + 1) % int(c.ema_every) == 0:
            ema_update(self.ema_model, self.model, float(c.ema_decay))
        return loss_v, gn_v, metrics, finite

    def _non_finite(self, loss_v: float, gn_v: float, metrics: dict) -> None:
        bad = [n for n, v in (("loss", loss_v), ("grad_norm", gn_v)) if not math.isfinite(v)]
        for k, v in metrics.items():
            try:
                if not math.isfinite(to_float(v)):
                    bad.append(k)
            except (TypeError, ValueError):
                pass
        bad = list(dict.fromkeys(bad))  # the objective's metrics repeat "loss"
        step = self.step + 1
        last = str(self.last_checkpoint) if self.last_checkpoint else "none"
        msg = (f"non-finite values at step {step}: {', '.join(bad)} (loss={loss_v}, grad_norm={gn_v}); "
               f"the update was not applied. Last good checkpoint: {last}")
        if self.cfg.on_nan == "skip" and self.nan_skips < int(self.cfg.max_nan_skips):
            self.nan_skips += 1
            if self.dist.is_main:
                warnings.warn(f"{msg}. Skipping ({self.nan_skips}/{self.cfg.max_nan_skips}).", stacklevel=2)
            return
        if self.cfg.on_nan == "skip":
            msg += f". Skipped {self.nan_skips} times already (max_nan_skips={self.cfg.max_nan_skips})"
        raise NonFiniteError(msg)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        c = self.cfg
        total = int(c.steps)
        log_every, ckpt_every = max(int(c.log_every), 1), int(c.checkpoint_every)
        if self.step >= total and self.dist.is_main:
            warnings.warn(f"already at step {self.step} >= trainer.steps={total}: nothing to train "
                          f"(raise trainer.steps to continue this run)", stacklevel=2)
        logger = None
        if self.dist.is_main:
            logger = RunLogger(self.run_dir, self.logger_cfg, self.config, total, self.step, self.wandb_id)
            self.wandb_id = logger.wandb_id
        self.model.train()
        if isinstance(self.objective, nn.Module):
            self.objective.train()
        if self._iter is None:
            self._iter = self._make_iter()
        if self._rng_to_restore is not None:  # last, so setup above cannot shift the RNG streams
            ckpt.set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

        start_step, samples, t_start = self.step, 0, time.perf_counter()
        meter = Throughput()
        meter.reset(self.step, 0)
        loss_sum, loss_n, last_loss, acc = 0.0, 0, float("nan"), {}
        flops_per_sample, peak = None, None
        try:
            while self.step < total:
                batches = [self.batch_to_device(self._next_batch()) for _ in range(self.accum)]
                per_step = sum(_batch_size(b) for b in batches) * self.dist.world_size
                if flops_per_sample is None and c.measure_mfu:
                    flops_per_sample = training_flops_per_sample(self.model, self.objective, batches[0]) or 0.0
                loss_v, gn_v, metrics, finite = self._train_step(*batches)
                if not finite:
                    self._non_finite(loss_v, gn_v, metrics)  # raises unless skipping
                self.step += 1
                samples += per_step
                if finite:
                    last_loss = loss_v
                    loss_sum, loss_n = loss_sum + loss_v, loss_n + 1
                    for k, v in metrics.items():
                        acc[k] = acc.get(k, 0.0) + _mean_metric(v)

                if self.step % log_every == 0 or self.step == total:
                    steps_s, samples_s = meter.rates(self.step, samples)
                    row = {"loss": loss_sum / loss_n if loss_n else float("nan"),
                           "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": gn_v,
                           "steps_per_s": steps_s, "samples_per_s": samples_s, "epoch": self.epoch,
                           **{k: to_float(v) / loss_n for k, v in acc.items()}}  # acc: finite steps only
                    if self.nan_skips:
                        row["nan_skips"] = self.nan_skips
                    if flops_per_sample:
                        row["tflops_per_device"] = flops_per_sample * samples_s / self.dist.world_size / 1e12
                        if self.device.type == "cuda":
                            peak = peak or measure_matmul_peak(str(self.device))
                            row["mfu"] = row["tflops_per_device"] * 1e12 / peak
                    if logger:
                        logger.log(self.step, row)
                        logger.progress(self.step, {"loss": row["loss"], "steps/s": steps_s,
                                                    "samples/s": samples_s})
                    loss_sum, loss_n, acc = 0.0, 0, {}
                elif logger:  # every step: count, rate and ETA from the first steps (no extra device sync)
                    logger.progress(self.step)

                paused = False
                if self.eval_fn is not None and self.eval_every and self.step % self.eval_every == 0:
                    self._evaluate(logger)
                    paused = True
                if ckpt_every and self.step % ckpt_every == 0:
                    self.save_checkpoint()
                    if logger:
                        logger.plot(self.step)
                    paused = True
                if paused:  # training throughput: validation and checkpoint writing are not steps
                    meter.reset(self.step, samples)
            if self.last_checkpoint is None or self.last_checkpoint.name != ckpt.STEP_DIR.format(self.step):
                self.save_checkpoint()  # the final weights are always on disk
        finally:
            self._close_iter()  # stop DataLoader workers now, not in a slow gc of an exception frame
            if logger:
                logger.plot(self.step)  # also after a crash: the curves up to it
                logger.close()
        elapsed = max(time.perf_counter() - t_start, 1e-9)
        # None, not NaN, when this call trained no step (a resume already at trainer.steps)
        return dict(final_step=self.step, last_loss=None if self.step == start_step else last_loss,
                    metrics_path=str(self.run_dir / "metrics.jsonl"),
                    curves_path=str(self.run_dir / "curves.png") if (self.run_dir / "curves.png").exists() else None,
                    checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                    steps_per_s=(self.step - start_step) / elapsed, samples_per_s=samples / elapsed,
                    nan_skips=self.nan_skips)

    def _evaluate(self, logger) -> None:
        was_training = self.model.training
        with torch.no_grad(), self._step_context():
            results = self.eval_fn(self.ema_model, self.step) or {}
        self.model.train(was_training)
        if logger and results:
            logger.log(self.step, {f"eval/{k}": to_float(v) for k, v in results.items()})

    # ------------------------------------------------------------------ checkpoints
    _FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
    _RESUME_SECTIONS = ("model", "objective", "dataset", "clip", "data_dir", "init")

    def _warn_config_changes(self, path: Path) -> None:
        """Resuming continues with the command's settings: say which of the run's differ (a resume
        without the run's overrides would otherwise quietly train something else)."""
        try:
            with open(path / "config.json") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return
        now = json.loads(json.dumps(self.config, default=ckpt._json_default))
        changed = [k for k in _config_diff({k: saved.get(k) for k in self._RESUME_SECTIONS if k in saved},
                                           {k: now.get(k) for k in self._RESUME_SECTIONS if k in saved})]
        if changed and self.dist.is_main:
            warnings.warn(f"resuming {path} with settings that differ from the run's: {', '.join(changed[:8])}"
                          + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
                          + f"; the run's settings are in {path / 'config.yaml'}", stacklevel=3)

    def save_checkpoint(self) -> Path:
        """Collective: every rank calls it; rank 0 writes `checkpoints/step_XXXXXXXX`."""
        main, rank = self.dist.is_main, self.dist.rank
        tmp = ckpt.tmp_dir_for(self.run_dir, self.step)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "trainer_state").mkdir(parents=True)
        barrier()
        ema_sd = get_model_state_dict(self.ema_model, options=self._FULL)
        train_sd, optim_sd = get_state_dict(self.train_module, self.optimizer, options=self._FULL)
        ckpt.write_json(tmp / "trainer_state" / f"rng_rank{rank}.json", ckpt.rng_state())
        if main:
            state_dir = tmp / "trainer_state"
            ckpt.save_tensors(ckpt.clean_state_dict(ema_sd), tmp / "model.safetensors", {"weights": "ema"})
            student = {k[len("model."):]: v for k, v in train_sd.items() if k.startswith("model.")}
            obj = {k[len("objective."):]: v for k, v in train_sd.items() if k.startswith("objective.")}
            ckpt.save_tensors(ckpt.clean_state_dict(student), state_dir / "student.safetensors")
            if obj:
                ckpt.save_tensors(obj, state_dir / "objective.safetensors")
            tensors, rest = ckpt.flatten_optimizer_state(optim_sd)
            ckpt.save_tensors(tensors, state_dir / "optimizer.safetensors")
            ckpt.write_json(state_dir / "optimizer.json", rest)
            ckpt.write_json(state_dir / "state.json", dict(
                step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, nan_skips=self.nan_skips,
                micro_batch=self._micro_batch(),
                wandb_run_id=self.wandb_id, world_size=self.dist.world_size, parallel=self.parallel,
                precision=self.precision, format_version=1))
            ckpt.write_json(tmp / "config.json", self.config)
            plain = json.loads(json.dumps(self.config, default=ckpt._json_default))  # Paths, numpy -> JSON types
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(plain)))
            for name, content in self.extra_files.items():
                ckpt.write_json(tmp / name, content)
        barrier()
        final = ckpt.checkpoint_root(self.run_dir) / ckpt.STEP_DIR.format(self.step)
        if main:
            final = ckpt.commit(self.run_dir, tmp, self.step, int(self.cfg.keep_last or 0))
        barrier()
        self.last_checkpoint = final
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything for an exact continuation (collective under torchrun)."""
        path = ckpt.resolve_checkpoint(path)
        state_dir = path / "trainer_state"
        if not (state_dir / "state.json").is_file():
            raise FileNotFoundError(f"{path} has no trainer_state/ (an exported checkpoint?): cannot resume; "
                                    f"use load_model_weights to initialise from it instead")
        read = ckpt.read_safetensors
        train_sd = {f"model.{k}": v for k, v in read(state_dir / "student.safetensors").items()}
        if (state_dir / "objective.safetensors").is_file():
            train_sd.update({f"objective.{k}": v for k, v in read(state_dir / "objective.safetensors").items()})
        with open(state_dir / "optimizer.json") as f:
            optim_sd = ckpt.unflatten_optimizer_state(read(state_dir / "optimizer.safetensors"), json.load(f))
        # Checked here, not left to set_model_state_dict: its strict=True let missing keys through
        # (torch 2.13), so a deeper model resumed with random extra blocks.
        ema_sd = read(path / "model.safetensors")
        problems = (ckpt.state_dict_mismatches(train_sd, self.train_module.state_dict())
                    + ckpt.state_dict_mismatches(ema_sd, self.ema_model.state_dict()))
        if problems:  # e.g. resumed without the overrides the run was started with
            raise ValueError(f"cannot resume from {path}: its weights do not fit this run's model "
                             f"({len(problems)} mismatches):\n{ckpt.mismatch_report(problems)}\nResume with the same "
                             f"model/data overrides as the run; they are in {path / 'config.yaml'}")
        set_model_state_dict(self.train_module, train_sd, options=StateDictOptions(full_state_dict=True, strict=True))
        # Parameters that never had a gradient (unused heads) have no optimizer state: an empty entry
        # each (torch <= 2.7's loader raised KeyError without one; strict=False was enough later).
        stateless = {name for name, _ in self.train_module.named_parameters()} - set(optim_sd["state"])
        optim_sd["state"].update({name: {} for name in stateless})
        set_optimizer_state_dict(self.train_module, self.optimizer, optim_sd,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        for name, p in self.train_module.named_parameters():
            if name in stateless:  # drop the step-1 zero state DCP creates for them
                self.optimizer.state.pop(p, None)
        set_model_state_dict(self.ema_model, ema_sd, options=StateDictOptions(full_state_dict=True, strict=True))
        with open(state_dir / "state.json") as f:
            state = json.load(f)
        self._warn_config_changes(path)
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = self._resume_position(state)
        self.nan_skips, self.wandb_id = state.get("nan_skips", 0), state.get("wandb_run_id")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size and self.dist.is_main:
            warnings.warn(f"resuming a run saved by {saved_world} process(es) on {self.dist.world_size}: the global "
                          "batch and data order stay the same, but the per-rank noise streams differ, so the "
                          "continuation is not the one the original run would have had", stacklevel=2)
        rng_file = state_dir / f"rng_rank{self.dist.rank}.json"
        if not rng_file.is_file():  # resumed with more ranks than saved: derive, do not reuse rank 0's
            seed_everything(int(self.cfg.seed) + self.dist.rank + 1000 * self.step)
        else:
            with open(rng_file) as f:
                self._rng_to_restore = json.load(f)
        self._iter = None
        self.last_checkpoint = path
        if self.dist.is_main:
            print(f"[trainer] resumed from {path} at step {self.step} (epoch {self.epoch}, "
                  f"batch {self.batch_in_epoch})")


def _module_params(obj) -> list[nn.Parameter]:
    return list(obj.parameters()) if isinstance(obj, nn.Module) else []


def _module_tensors(obj) -> list[torch.Tensor]:
    return [*obj.parameters(), *obj.buffers()] if isinstance(obj, nn.Module) else []
