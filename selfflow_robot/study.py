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
import sys
import time
import traceback

from omegaconf import OmegaConf, open_dict

from . import cli
from .fileio import write_json_atomic
from .interrupts import deliver_swallowed_interrupts
from .quickstart import _dataset, _evaluate, _model, _trainer
from .threads import prefer_passive_openmp

prefer_passive_openmp()  # before torch is imported


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
        errors = int((s.get("throughput") or {}).get("errors") or 0)
        if not s.get("complete", True) or errors:  # e.g. every episode failed to render: no success rate
            rows.append({"step": step, "error": f"{s.get('episodes', 0)} of {s.get('episodes_expected')} episodes "
                                                f"finished, {errors} failed (records in {os.path.join(out, ckpt.name)})"})
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


def _arm_process(cfg_yaml: str, objective: str, seed: int, out: str, store: str, result: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # arms share the CPU cores instead of each taking all of them
    try:
        with deliver_swallowed_interrupts():
            write_json_atomic(result, run_arm(OmegaConf.create(cfg_yaml), objective, seed, out, store))
    except KeyboardInterrupt:  # the parent says what was kept
        sys.exit(130)


class ArmFailed(RuntimeError):
    pass


def _run_parallel(cfg, arms: list[tuple[int, str]], out: str, store: str, n: int, done) -> None:
    """Up to n arms at once, one spawned process each, started in `arms` order."""
    import multiprocessing as mp
    import signal

    ctx, pending, live = mp.get_context("spawn"), list(arms), {}
    cfg_yaml = OmegaConf.to_yaml(cfg)
    threads = max(1, (os.cpu_count() or 1) // n)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the arms
    try:
        while pending or live:
            while pending and len(live) < n:
                seed, objective = pending.pop(0)
                result = os.path.join(out, "runs", f"{objective}_seed{seed}", "study_arm.json")
                os.makedirs(os.path.dirname(result), exist_ok=True)  # a fresh out_dir (check())
                p = ctx.Process(target=_arm_process, args=(cfg_yaml, objective, seed, out, store, result, threads),
                                name=f"{objective}_seed{seed}")
                p.start()
                live[p] = result
            for p in list(live):
                p.join(timeout=0.5)
                if p.exitcode is None:
                    continue
                result = live.pop(p)
                if p.exitcode == 130:
                    raise KeyboardInterrupt
                if p.exitcode != 0 or not os.path.exists(result):
                    raise ArmFailed(f"study arm {p.name} failed (exit code {p.exitcode}); its error is above")
                with open(result) as f:
                    done(json.load(f))
    finally:
        for p in live:  # an error or Ctrl-C: stop the arms still running
            p.terminate()
            p.join()


def _as_list(cfg, key: str) -> list:
    """`objectives=self_flow` means [self_flow], not its characters."""
    v = cfg[key]
    items = [v] if isinstance(v, (str, int)) else list(v)
    if not items:
        raise ValueError(f"study option {key} is empty")
    return items


def check(cfg) -> None:
    """Refuse what would fail only after the demos are collected and earlier arms have trained."""
    import importlib.resources

    with open_dict(cfg):
        for key in ("objectives", "seeds", "tasks"):
            cfg[key] = _as_list(cfg, key)
    known = sorted(f.name[:-5] for f in (importlib.resources.files("selfflow_robot.configs") / "objective").iterdir()
                   if f.name.endswith(".yaml"))
    bad = [o for o in cfg.objectives if o not in known]
    if bad:
        raise ValueError(f"unknown objective(s) {bad}; objectives= takes any of {known}")
    if len(set(cfg.objectives)) != len(cfg.objectives) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"objectives and seeds must not repeat, got {list(cfg.objectives)} and {list(cfg.seeds)}")
    if int(cfg.parallel_arms) < 1:
        raise ValueError(f"parallel_arms must be >= 1, got {cfg.parallel_arms}")
    refuse_existing_study(cfg.out_dir, "study_report", markers=("runs.json", "runs"))


def refuse_existing_study(out_dir, report_module: str, markers=("runs.json",)) -> None:
    """A ValueError when out_dir already holds a study (any of `markers` exists): a new study there
    would overwrite its runs, whose report `python -m selfflow_robot.<report_module>` rebuilds."""
    out = os.path.abspath(str(out_dir))
    if any(os.path.exists(os.path.join(out, m)) for m in markers):
        raise ValueError(f"out_dir {out} already holds a study: choose a new out_dir (its report can be rebuilt "
                         f"with python -m selfflow_robot.{report_module} {out})")


def start_study_dir(cfg) -> str:
    """The absolute out_dir, created, with the study's resolved config saved as study.yaml."""
    out = os.path.abspath(str(cfg.out_dir))
    os.makedirs(out, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(out, "study.yaml"))
    return out


def main(cfg) -> dict:
    from .data.sources import open_store, store_path
    from .study_report import print_report, write_report

    OmegaConf.resolve(cfg)
    check(cfg)
    out = start_study_dir(cfg)
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
        write_json_atomic(os.path.join(out, "runs.json"), runs, indent=1)  # read whole by a poller, kept on Ctrl-C

    n = int(cfg.parallel_arms)
    try:
        if n == 1:
            for seed, objective in arms:
                done(run_arm(cfg, objective, seed, out, store))
        else:
            _run_parallel(cfg, arms, out, store, n, done)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(kept(out, runs, len(arms))) from None
    except ArmFailed as e:
        raise SystemExit(f"error: {e}\n{kept(out, runs, len(arms))}") from None
    report = write_report(runs, out, OmegaConf.to_container(cfg, resolve=True), wall_s=time.time() - t0)
    print_report(report)
    return report


def kept(out: str, runs: list[dict], planned: int) -> str:
    """What an interrupted study leaves, and what to do with it."""
    if not runs:
        return f"no run of the {planned} had finished; {out} holds the partial first runs"
    return (f"{len(runs)} of {planned} runs finished and are kept in {os.path.join(out, 'runs.json')}; "
            f"python -m selfflow_robot.study_report {out} reports the seeds every arm finished")


def cli_main(argv: list[str] | None = None) -> dict:
    cfg = cli.compose_argv("study", sys.argv[1:] if argv is None else list(argv))
    with cli.reported_errors():
        return main(cfg)


if __name__ == "__main__":
    cli_main()
