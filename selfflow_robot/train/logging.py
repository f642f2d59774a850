"""Run logging: tqdm progress bar, `<run_dir>/metrics.jsonl` (plotted to `<run_dir>/curves.png`), and wandb.

wandb mode `auto` is online only when an API key is available (WANDB_API_KEY or a
`wandb login` entry in ~/.netrc), offline otherwise; WANDB_MODE in the environment wins.
A failing wandb init never stops training: it falls back to disabled with a warning.
Only rank 0 constructs a RunLogger.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(requested: str | None) -> str:
    requested = (requested or "auto").lower()
    if requested not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logger.wandb must be auto|online|offline|disabled, got {requested!r}")
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _has_wandb_key() else "offline"


def to_float(v) -> float:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().mean().item()
    return float(v)


class RunLogger:
    def __init__(self, run_dir: str | Path, cfg: dict, config: dict | None, total_steps: int,
                 start_step: int = 0, wandb_id: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.use_jsonl = bool(cfg.get("jsonl", True))
        if self.use_jsonl:
            _truncate_after(self.metrics_path, start_step)  # drop lines a killed run wrote past the checkpoint
        self.curves = self.use_jsonl and bool(cfg.get("curves", True))
        self._plotted_step: int | None = None
        self.wandb_run = None
        self.wandb_id = wandb_id
        self._init_wandb(cfg, config, wandb_id)
        self.bar = None
        if cfg.get("progress_bar", True):
            from tqdm.auto import tqdm

            import sys

            # In a log file (not a terminal) a refresh every second would flood it.
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0, smoothing=0.1)

    def _init_wandb(self, cfg: dict, config: dict | None, wandb_id: str | None) -> None:
        mode = wandb_mode(cfg.get("wandb", "auto"))
        if mode == "disabled":
            return
        try:
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.get("project", "selfflow-robot"), entity=cfg.get("entity"), name=cfg.get("name"),
                tags=list(cfg.get("tags") or []), config=config, dir=str(self.run_dir), mode=mode,
                id=wandb_id, resume="allow" if wandb_id else None,
                settings=wandb.Settings(init_timeout=float(cfg.get("init_timeout", 60))),
            )
            self.wandb_id = self.wandb_run.id
        except Exception as e:  # no network, no key, bad entity...: keep training
            warnings.warn(f"wandb init failed ({type(e).__name__}: {e}); continuing with wandb disabled",
                          stacklevel=2)
            self.wandb_run = None

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self.use_jsonl:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in row.items() if v is not None}, step=step)
            except Exception as e:
                warnings.warn(f"wandb.log failed ({e}); disabling wandb", stacklevel=2)
                self.wandb_run = None

    def progress(self, step: int, postfix: dict | None = None) -> None:
        """Called every step (tqdm's own rate and ETA); the postfix (loss, rates) at log steps."""
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(step - self.bar.n)  # redraws at most every mininterval

    def plot(self, step: int) -> str | None:
        """Redraw <run_dir>/curves.png from metrics.jsonl (at checkpoints and at the end); a
        plotting failure only warns."""
        if not self.curves or step == self._plotted_step or not self.metrics_path.exists():
            return None
        from .curves import plot_curves

        try:
            path = plot_curves({self.run_dir.name: self.metrics_path}, self.run_dir / "curves.png",
                               title=f"{self.run_dir} (step {step})")
        except Exception as e:  # a plot is never worth a training run
            warnings.warn(f"could not plot {self.metrics_path} ({type(e).__name__}: {e})", stacklevel=2)
            return None
        self._plotted_step = step
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception:
                pass


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = to_float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf literals
    return v


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a half-written last line from a killed run
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


class Throughput:
    """steps/s and samples/s over the interval since the last call."""

    def __init__(self):
        self.t0, self.step0, self.samples0 = time.perf_counter(), 0, 0

    def reset(self, step: int, samples: int) -> None:
        self.t0, self.step0, self.samples0 = time.perf_counter(), step, samples

    def rates(self, step: int, samples: int) -> tuple[float, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = ((step - self.step0) / dt, (samples - self.samples0) / dt)
        self.reset(step, samples)
        return out
