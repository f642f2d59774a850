"""Evaluate a policy in Gymnasium envs: `python -m selfflow_robot.evaluate env=metaworld policy=expert`.

    python -m selfflow_robot.evaluate env=metaworld policy=runs/ft/checkpoints/latest episodes_per_task=20
    python -m selfflow_robot.evaluate env=simpler env.task=google_robot_pick_coke_can policy=ws://gpu-box:8000
    torchrun --nproc-per-node 4 -m selfflow_robot.evaluate ...    # episodes shard over ranks, merged on rank 0

In Python (returns the summary dict; see docs/evaluation.md):

    from selfflow_robot.evaluate import evaluate
    summary = evaluate(["env=metaworld", "policy=expert", "episodes_per_task=3"])
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfflow_robot.cli import compose, run, to_container
from selfflow_robot.threads import prefer_passive_openmp

prefer_passive_openmp()  # before torch is imported


def main(cfg: DictConfig | dict) -> dict:
    from selfflow_robot.evaluation import evaluate as run_evaluation

    c = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    c.pop("hydra", None)
    return run_evaluation(c)


def evaluate(overrides: list[str] | None = None, **kwargs: Any) -> dict:
    """In-process entry: Hydra overrides (`["env=simpler", "env.task=..."]`) and/or keyword values
    merged on top (`evaluate(policy="expert", episodes_per_task=2)`); returns the summary.
    `policy` may be an object with reset(instruction) / act(obs); it then runs in this process."""
    policy = kwargs.get("policy")
    if policy is None or isinstance(policy, str):
        policy = None
    else:  # a policy object: kept out of the config, evaluated in-process
        kwargs = {k: v for k, v in kwargs.items() if k != "policy"}
    cfg = compose("evaluate", list(overrides or []))
    if kwargs:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(kwargs))
    c = to_container(cfg)
    if policy is not None:
        c["policy"] = policy
    return main(c)


def _main_exit_on_errors(cfg: DictConfig) -> None:
    """The command exits non-zero when episodes failed (their tracebacks are in errors.rank*.jsonl;
    the same command retries them), so scripts and CI notice a run that scored nothing."""
    summary = main(cfg)
    errors = (summary.get("throughput") or {}).get("errors", 0)
    if errors:
        raise SystemExit(f"error: {errors} episode(s) failed (tracebacks in {summary['out_dir']}/errors.rank*.jsonl)"
                         "; the same command retries them")


def cli() -> None:
    run("evaluate", _main_exit_on_errors)


if __name__ == "__main__":
    cli()
