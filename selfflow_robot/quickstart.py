"""`python -m selfflow_robot.quickstart`: the whole toolkit in ~8 minutes on 2 CPU cores.

Meta-World expert demos -> Self-Flow pretraining of a small backbone on their frames -> video-action
fine-tuning initialised from it -> evaluation on the same tasks (unseen seeds). Everything goes
under `out_dir` (collect/ pretrain/ finetune/ eval/ and quickstart.json). Options: configs/quickstart.yaml.
"""
from __future__ import annotations

import json
import os
import time

from omegaconf import DictConfig, OmegaConf

from . import cli
from .threads import prefer_passive_openmp

prefer_passive_openmp()  # before torch is imported


def _null(v) -> str:
    return "null" if v is None else str(v)


def _model(cfg) -> list[str]:
    m = OmegaConf.to_container(cfg.model, resolve=True)
    return [f"model={m.pop('name')}"] + [f"model.{k}={v}" for k, v in m.items()]


def _dataset(cfg, store: str) -> list[str]:
    tasks = ",".join(cfg.tasks)
    size = ",".join(str(int(x)) for x in cfg.image_size)
    return ["dataset=metaworld", f"dataset.tasks=[{tasks}]", f"dataset.episodes_per_task={cfg.episodes_per_task}",
            f"dataset.image_size=[{size}]", f"dataset.state_mode={cfg.state_mode}", f"dataset.store_dir={store}",
            f"clip.image_size=[{size}]", f"dataset.workers={cfg.get('collect_workers', 2)}"]


def _trainer(stage, cfg, checkpoint_every=None) -> list[str]:
    """Trainer and logger overrides of a fine-tuning or pretraining run (quickstart stages, study arms)."""
    return [f"trainer.steps={stage.steps}", f"trainer.batch_size={stage.batch_size}", f"trainer.lr={stage.lr}",
            f"trainer.ema_decay={stage.ema_decay}", f"trainer.warmup_steps={max(1, int(stage.steps) // 20)}",
            f"trainer.checkpoint_every={checkpoint_every or stage.steps}", "trainer.num_workers=0",
            f"trainer.device={cfg.device}", f"trainer.log_every={max(1, int(stage.steps) // 50)}",
            "trainer.precision=fp32" if cfg.device == "cpu" else "trainer.precision=auto", f"logger={cfg.logger}"]


def _evaluate(cfg, policy: str, out_dir: str) -> list[str]:
    """`python -m selfflow_robot.evaluate` overrides for Meta-World rollouts of `policy`."""
    e = cfg.evaluate
    return ["env=metaworld", f"policy={policy}", f"episodes_per_task={e.episodes_per_task}", f"seed={e.seed}",
            f"workers={e.workers}", f"out_dir={out_dir}", f"device={cfg.device}",
            f"+policy_kwargs.sampler_steps={e.sampler_steps}", f"+policy_kwargs.execute_steps={e.execute_steps}",
            f"max_episode_steps={_null(e.max_episode_steps)}", "progress=false"]


def _train(job: str, overrides: list[str]) -> dict:
    from .jobs import run_training

    return run_training(cli.compose(job, overrides), job)


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.0f}%"


def print_table(summary: dict) -> str:
    rows = [f"| {t} | {r['successes']}/{r['episodes']} | {100 * r['success_rate']:.0f}% |"
            for t, r in sorted(summary["tasks"].items())]
    table = "\n".join(["| task | successes | success rate |", "|---|---|---|", *rows,
                       f"| **mean** | | **{_percent(summary['mean_success'])}** |"])
    print(table)
    return table


def main(cfg: DictConfig) -> dict:
    from .data.sources import open_store
    from .evaluate import evaluate

    OmegaConf.resolve(cfg)  # fixes out_dir's timestamp once
    out = os.path.abspath(str(cfg.out_dir))
    os.makedirs(out, exist_ok=True)
    d = {k: os.path.join(out, k) for k in ("collect", "pretrain", "finetune", "eval")}
    t0, times = time.time(), {}
    if cfg.get("store_dir"):
        d["collect"] = os.path.abspath(os.path.expanduser(str(cfg.store_dir)))
    data = _dataset(cfg, d["collect"])

    print(f"[quickstart] 1/4 collecting {cfg.episodes_per_task} demos x {list(cfg.tasks)} -> {d['collect']}")
    store = open_store(cli.compose("finetune", data).dataset)
    times["collect_s"] = time.time() - t0

    print(f"[quickstart] 2/4 Self-Flow pretraining ({cfg.pretrain.steps} steps) -> {d['pretrain']}")
    t = time.time()
    pre = _train("pretrain", [*data, *_model(cfg), *_trainer(cfg.pretrain, cfg), "validation.every=0",
                              "objective=self_flow", f"run_dir={d['pretrain']}", *cfg.pretrain.overrides])
    times["pretrain_s"] = time.time() - t

    print(f"[quickstart] 3/4 video-action fine-tuning ({cfg.finetune.steps} steps) -> {d['finetune']}")
    t = time.time()
    ft = _train("finetune", [*data, *_model(cfg), *_trainer(cfg.finetune, cfg), "validation.every=0",
                             "objective=self_flow", f"use_state={cfg.use_state}", f"init={d['pretrain']}",
                             f"run_dir={d['finetune']}", *cfg.finetune.overrides])
    times["finetune_s"] = time.time() - t

    e = cfg.evaluate
    print(f"[quickstart] 4/4 evaluating {e.episodes_per_task} episodes x {len(cfg.tasks)} tasks -> {d['eval']}")
    t = time.time()
    ev = evaluate([*_evaluate(cfg, d["finetune"], d["eval"]), *e.overrides])
    times["evaluate_s"] = time.time() - t
    if not ev.get("complete"):
        raise RuntimeError(f"evaluation incomplete ({ev.get('episodes')}/{ev.get('episodes_expected')} episodes); "
                           f"see the errors above and {d['eval']}")
    times["total_s"] = time.time() - t0

    print("\n[quickstart] success on the training tasks (unseen seeds):")
    table = print_table(ev)
    result = {"mean_success": ev["mean_success"],
              "tasks": {k: v["success_rate"] for k, v in ev["tasks"].items()},
              "times": {k: round(v, 1) for k, v in times.items()}, "table": table,
              "demos": len(store),
              "pretrain": {k: pre.get(k) for k in ("checkpoint", "metrics_path", "curves_path", "last_loss")},
              "finetune": {k: ft.get(k) for k in ("checkpoint", "metrics_path", "curves_path", "last_loss",
                                                  "validation")},
              "eval": {"summary": ev.get("files", {}), "videos": os.path.join(d["eval"], "videos")},
              "config": OmegaConf.to_container(cfg, resolve=True)}
    with open(os.path.join(out, "quickstart.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\n[quickstart] done in {times['total_s'] / 60:.1f} min\n"
          f"  demos:       {d['collect']} ({len(store)} episodes)\n"
          f"  checkpoints: {pre.get('checkpoint')}\n               {ft.get('checkpoint')}\n"
          f"  metrics:     {pre.get('metrics_path')}\n               {ft.get('metrics_path')}\n"
          f"  curves:      {pre.get('curves_path')}\n               {ft.get('curves_path')}\n"
          f"  eval:        {ev.get('files', {}).get('md')} (plot {ev.get('files', {}).get('png')})\n"
          f"  videos:      {os.path.join(d['eval'], 'videos')}\n"
          f"  summary:     {os.path.join(out, 'quickstart.json')}")
    return result


def cli_main(argv: list[str] | None = None) -> dict:
    # Composed without @hydra.main: the stages compose their own configs (pretrain, finetune, evaluate).
    import sys

    cfg = cli.compose_argv("quickstart", sys.argv[1:] if argv is None else list(argv))
    with cli.reported_errors("the stages that finished are kept under out_dir (default outputs/quickstart/<time>/)"):
        return main(cfg)


if __name__ == "__main__":
    cli_main()
