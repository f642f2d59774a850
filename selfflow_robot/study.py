"""`python -m selfflow_robot.study`: flow matching vs DTS vs Self-Flow against training steps.

Every arm fine-tunes the same video-action model (same seeded init or a shared pretrained `init`,
same data, same steps and data order per seed); only `objective=` differs. Validation metrics come
from the trainer's metrics.jsonl, success from rolling out each kept checkpoint. The report
(study_report.py) says how many steps Self-Flow needs to match flow matching's final values.
Options: configs/study.yaml; results and the GPU configuration: docs/study.md.
"""
from __future__ import annotations

import json
import os

# Sleeping (not spinning) OpenMP threads: on a CPU shared with other jobs, spinning torch threads
# slowed training ~10x in our runs. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys
import time

from omegaconf import OmegaConf

from . import cli
from .quickstart import _dataset, _evaluate, _model, _trainer


def _finetune_overrides(cfg, objective: str, seed: int, run_dir: str, store: str) -> list[str]:
    v = cfg.validation
    return [*_dataset(cfg, store), *_model(cfg), f"objective={objective}", f"use_state={cfg.use_state}",
            f"init={cfg.init}", f"run_dir={run_dir}", f"trainer.seed={seed}",
            *_trainer(cfg, cfg, checkpoint_every=cfg.checkpoint_every), "trainer.keep_last=0",
            "logger.progress_bar=false", f"validation.every={v.every}", f"validation.batches={v.batches}",
            f"validation.fraction={v.fraction}", *cfg.overrides]


def _validation_rows(run_dir: str) -> list[dict]:
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "eval/val_flow_loss" in r:
                rows.append({"step": r["step"], "val_flow_loss": r["eval/val_flow_loss"],
                             "val_action_mse": r.get("eval/val_action_mse")})
    return rows


def _success(cfg, run_dir: str, out: str) -> list[dict]:
    from .evaluate import evaluate
    from .train.checkpoint import list_checkpoints

    e, rows = cfg.evaluate, []
    if int(e.episodes_per_task) <= 0:
        return rows
    for ckpt in list_checkpoints(run_dir):
        step = int(ckpt.name.split("_")[1])
        s = evaluate([*_evaluate(cfg, str(ckpt), os.path.join(out, ckpt.name)), "videos_per_task=0"])
        rows.append({"step": step, "success": s["mean_success"],
                     "tasks": {t: r["success_rate"] for t, r in s["tasks"].items()}})
    return rows


def main(cfg) -> dict:
    from .data.sources import open_store, store_path
    from .jobs import run_training
    from .study_report import write_report

    OmegaConf.resolve(cfg)
    out = os.path.abspath(str(cfg.out_dir))
    os.makedirs(out, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(out, "study.yaml"))
    explicit = os.path.abspath(cfg.store_dir) if cfg.store_dir else "null"
    dataset = cli.compose("finetune", _dataset(cfg, explicit)).dataset
    store = store_path(dataset)  # store_dir, or the dataset cache
    open_store(dataset)  # collect once, before the arms
    runs, t0 = [], time.time()
    for seed in cfg.seeds:
        for objective in cfg.objectives:
            name = f"{objective}_seed{seed}"
            run_dir = os.path.join(out, "runs", name)
            print(f"[study] {name}: fine-tuning {cfg.steps} steps -> {run_dir}", file=sys.stderr)
            t = time.time()
            run_training(cli.compose("finetune", _finetune_overrides(cfg, objective, int(seed), run_dir, store)),
                         "finetune")
            train_s = time.time() - t
            success = _success(cfg, run_dir, os.path.join(out, "eval", name))
            runs.append({"objective": objective, "seed": int(seed), "run_dir": run_dir, "train_s": round(train_s, 1),
                         "eval_s": round(time.time() - t - train_s, 1), "validation": _validation_rows(run_dir),
                         "success": success})
            with open(os.path.join(out, "runs.json"), "w") as f:  # partial results survive an interruption
                json.dump(runs, f, indent=1)
    report = write_report(runs, out, OmegaConf.to_container(cfg, resolve=True), wall_s=time.time() - t0)
    print(report["markdown"])
    print(f"[study] report {report['md']}\n[study] plot {report['png']}\n[study] data {report['json']}")
    return report


def cli_main(argv: list[str] | None = None) -> dict:
    cfg = cli.compose_argv("study", sys.argv[1:] if argv is None else list(argv))
    return main(cfg)


if __name__ == "__main__":
    cli_main()
