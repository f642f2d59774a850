"""`python -m selfflow_robot.study`: flow matching vs DTS vs Self-Flow against training steps.

Every arm fine-tunes the same video-action model (same seeded init or a shared pretrained `init`,
same data, same steps and data order per seed); only `objective=` differs. Validation metrics come
from the trainer's metrics.jsonl, success from rolling out each kept checkpoint. The report
(study_report.py) says how many steps Self-Flow needs to match flow matching's final values.
With `parallel_arms=N` up to N runs train at once, each in its own spawned process (a small model
leaves most of a GPU idle; one process per run keeps their CUDA state apart). Runs start in
seed-major order and runs.json is rewritten as each ends, so an interrupted study keeps whole seeds:
`python -m selfflow_robot.study_report OUT` rebuilds the report from them.
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
import traceback

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
        try:
            s = evaluate([*_evaluate(cfg, str(ckpt), os.path.join(out, ckpt.name)), "videos_per_task=0"])
        except Exception as e:  # a broken simulator must not cost the trained run: record it, report "n/a"
            traceback.print_exc()
            rows.append({"step": step, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"step": step, "success": s["mean_success"],
                     "tasks": {t: r["success_rate"] for t, r in s["tasks"].items()}})
    return rows


def run_arm(cfg, objective: str, seed: int, out: str, store: str) -> dict:
    """Fine-tune one arm, roll out its checkpoints; the row runs.json keeps for it."""
    from .jobs import run_training

    name = f"{objective}_seed{seed}"
    run_dir = os.path.join(out, "runs", name)
    print(f"[study] {name}: fine-tuning {cfg.steps} steps -> {run_dir}", file=sys.stderr, flush=True)
    t = time.time()
    run_training(cli.compose("finetune", _finetune_overrides(cfg, objective, seed, run_dir, store)), "finetune")
    train_s = time.time() - t
    success = _success(cfg, run_dir, os.path.join(out, "eval", name))
    return {"objective": objective, "seed": seed, "run_dir": run_dir, "train_s": round(train_s, 1),
            "eval_s": round(time.time() - t - train_s, 1), "validation": _validation_rows(run_dir),
            "success": success}


def _arm_process(cfg_yaml: str, objective: str, seed: int, out: str, store: str, result: str) -> None:
    row = run_arm(OmegaConf.create(cfg_yaml), objective, seed, out, store)
    tmp = result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, result)


def _run_parallel(cfg, arms: list[tuple[int, str]], out: str, store: str, n: int, done) -> None:
    """Up to n arms at once, one spawned process each, started in `arms` order."""
    import multiprocessing as mp
    import signal

    ctx, pending, live = mp.get_context("spawn"), list(arms), {}
    cfg_yaml = OmegaConf.to_yaml(cfg)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the arms
    try:
        while pending or live:
            while pending and len(live) < n:
                seed, objective = pending.pop(0)
                result = os.path.join(out, "runs", f"{objective}_seed{seed}", "study_arm.json")
                os.makedirs(os.path.dirname(result), exist_ok=True)
                if os.path.exists(result):
                    os.remove(result)
                p = ctx.Process(target=_arm_process, args=(cfg_yaml, objective, seed, out, store, result),
                                name=f"{objective}_seed{seed}")
                p.start()
                live[p] = result
            for p in list(live):
                p.join(timeout=0.5)
                if p.exitcode is None:
                    continue
                result = live.pop(p)
                if p.exitcode != 0 or not os.path.exists(result):
                    raise RuntimeError(f"study arm {p.name} failed (exit code {p.exitcode}); its error is above. "
                                       f"Finished arms are in {os.path.join(out, 'runs.json')}")
                with open(result) as f:
                    done(json.load(f))
    finally:
        for p in live:  # an error or Ctrl-C: stop the arms still running
            p.terminate()
            p.join()


def main(cfg) -> dict:
    from .data.sources import open_store, store_path
    from .study_report import write_report

    OmegaConf.resolve(cfg)
    out = os.path.abspath(str(cfg.out_dir))
    os.makedirs(out, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(out, "study.yaml"))
    explicit = os.path.abspath(cfg.store_dir) if cfg.store_dir else "null"
    dataset = cli.compose("finetune", _dataset(cfg, explicit)).dataset
    store = store_path(dataset)  # store_dir, or the dataset cache
    open_store(dataset)  # collect once, before the arms
    arms = [(int(seed), str(objective)) for seed in cfg.seeds for objective in cfg.objectives]
    order = {arm: i for i, arm in enumerate(arms)}
    runs, t0 = [], time.time()

    def done(row: dict) -> None:
        row["finished_s"] = round(time.time() - t0, 1)
        runs.append(row)
        runs.sort(key=lambda r: order[(r["seed"], r["objective"])])
        with open(os.path.join(out, "runs.json"), "w") as f:  # partial results survive an interruption
            json.dump(runs, f, indent=1)

    n = int(cfg.parallel_arms)
    if n < 1:
        raise ValueError(f"parallel_arms must be >= 1, got {n}")
    if n == 1:
        for seed, objective in arms:
            done(run_arm(cfg, objective, seed, out, store))
    else:
        _run_parallel(cfg, arms, out, store, n, done)
    report = write_report(runs, out, OmegaConf.to_container(cfg, resolve=True), wall_s=time.time() - t0)
    print(report["markdown"])
    print(f"[study] report {report['md']}\n[study] plot {report['png']}\n[study] data {report['json']}")
    return report


def cli_main(argv: list[str] | None = None) -> dict:
    cfg = cli.compose_argv("study", sys.argv[1:] if argv is None else list(argv))
    return main(cfg)


if __name__ == "__main__":
    cli_main()
