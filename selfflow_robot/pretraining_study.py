"""`python -m selfflow_robot.pretraining_study [size=cpu|gpu]`: does Self-Flow pretraining on
action-free video make a better video-action policy than flow-matching pretraining?

Stages, per seed (every arm of a seed: the same init, data order, steps, batch and schedule):
1. data (once): an action-free video corpus (scripted Meta-World experts, actions dropped, frames
   as the policy's camera renders them; more tasks and episodes than fine-tuning), few-demo
   fine-tuning stores (one per demo budget, proprioception only) and held-out target-task episodes
   with Meta-World's full state (probe labels, world-model rollouts);
2. pretraining arms (`arms`): flow_matching, dts, self_flow, repa (needs a local encoder) on the
   corpus; `none` is the seeded random init;
3. identical fine-tuning from each arm's backbone: one objective for every arm, per demo budget;
4. measures: success on shared env seeds (action-first sampling at every kept checkpoint, joint
   sampling at the last), validation action error, rollout PSNR/SSIM, linear probe R^2.
runs.json is rewritten as each (arm, seed) finishes; the report is pretraining_study_report.py.
"""
from __future__ import annotations

import json
import os
import sys
import time

from omegaconf import OmegaConf, open_dict

from . import cli
from .fileio import write_json_atomic
from .quickstart import _model
from .study import refuse_existing_study, start_study_dir
from .threads import prefer_passive_openmp

prefer_passive_openmp()  # before torch is imported

PRETRAIN_ARMS = ("none", "flow_matching", "dts", "self_flow", "repa")


def _trainer(stage, cfg, checkpoint_every: int) -> list[str]:
    return [f"trainer.steps={stage.steps}", f"trainer.batch_size={stage.batch_size}", f"trainer.lr={stage.lr}",
            f"trainer.ema_decay={stage.ema_decay}", f"trainer.warmup_steps={max(1, int(stage.steps) // 20)}",
            f"trainer.checkpoint_every={checkpoint_every}", "trainer.keep_last=0", "trainer.num_workers=0",
            f"trainer.device={cfg.device}", f"trainer.log_every={max(1, int(stage.steps) // 50)}",
            "trainer.precision=fp32" if cfg.device == "cpu" else "trainer.precision=auto", f"logger={cfg.logger}",
            "logger.progress_bar=false", f"validation.every={stage.validation_every}",
            f"validation.batches={stage.validation_batches}"]


def _size(cfg) -> str:
    return "[" + ",".join(str(int(x)) for x in cfg.image_size) + "]"


def _demo_dataset(cfg, out: str, demos: int) -> list[str]:
    t = cfg.target
    return ["dataset=metaworld", f"dataset.tasks=[{','.join(t.tasks)}]", f"dataset.episodes_per_task={demos}",
            f"dataset.seed={t.seed}", f"dataset.image_size={_size(cfg)}", "dataset.state_mode=proprio",
            f"dataset.store_dir={os.path.join(out, 'data', f'demos_{demos}')}", f"clip.image_size={_size(cfg)}",
            f"dataset.workers={cfg.collect_workers}", f"dataset.camera={cfg.camera}"]


def build_data(cfg, out: str) -> dict:
    """The corpus, the held-out episodes and one demo store per budget (collection resumes)."""
    from .collect import collect_metaworld, resolve_tasks
    from .data.sources import open_store

    kw = dict(image_size=list(cfg.image_size), camera=cfg.camera, workers=int(cfg.collect_workers), progress=False)
    c, h = cfg.corpus, cfg.heldout
    paths = {"corpus": os.path.join(out, "data", "corpus"), "heldout": os.path.join(out, "data", "heldout")}
    tasks = resolve_tasks(list(dict.fromkeys([*resolve_tasks(c.tasks), *cfg.target.tasks])))
    collect_metaworld(paths["corpus"], tasks=tasks, episodes_per_task=int(c.episodes_per_task), seed=int(c.seed),
                      drop_actions=True, **kw)
    collect_metaworld(paths["heldout"], tasks=list(cfg.target.tasks), episodes_per_task=int(h.episodes_per_task),
                      seed=int(h.seed), state_mode="full", **kw)
    for n in cfg.target.demos:
        ds = cli.compose("finetune", _demo_dataset(cfg, out, int(n))).dataset
        open_store(ds)
    return paths


def _validation_rows(run_dir: str) -> list[dict]:
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "eval/val_flow_loss" in r:
                rows.append({"step": r["step"], "val_flow_loss": r["eval/val_flow_loss"],
                             "val_action_mse": r.get("eval/val_action_mse")})
    return rows


def flops_per_step(ckpt) -> float:
    """Training FLOPs of one step of the run that wrote `ckpt` (teacher forward included), from its
    saved config: the objective's own count for one sample of the clip's shape, times the batch."""
    import torch

    from .models import load_checkpoint_model
    from .objectives import build_objective

    model, config = load_checkpoint_model(ckpt)
    clip = config["clip"]
    h, w = (int(x) for x in clip["image_size"])
    batch = {"context": torch.zeros(1, int(clip["context_frames"]), h, w, 3, dtype=torch.uint8),
             "future": torch.zeros(1, int(clip["future_frames"]), h, w, 3, dtype=torch.uint8), "instruction": [""]}
    if int(clip.get("action_chunk") or 0) and model.action_head is not None:
        batch["actions"] = torch.zeros(1, int(clip["action_chunk"]), int(model.cfg.action_dim))
    return float(build_objective(config["objective"], model.cfg).flops_per_sample(batch)) * int(config["trainer"]["batch_size"])


def random_init_model(cfg, seed: int):
    """The seeded random backbone of the `none` arm (and step 0 of every probe curve)."""
    import torch

    from .models import model_config
    from .models.dit import SelfFlowDiT

    mcfg = OmegaConf.to_container(cli.compose("pretrain", _model(cfg)).model, resolve=True)
    torch.manual_seed(int(seed))
    return SelfFlowDiT(model_config(mcfg)).eval().requires_grad_(False)


def probe_layer(cfg, model) -> int:
    return int(cfg.probe.layer) if cfg.probe.layer else max(1, model.cfg.depth // 2)


def pretrain_arm(cfg, arm: str, seed: int, out: str, corpus: str, probe) -> dict:
    """Pretrain one arm on the corpus (or nothing for `none`); probe every kept checkpoint."""
    from .jobs import run_training
    from .models import load_checkpoint_model
    from .study_metrics import probe_checkpoint
    from .train.checkpoint import list_checkpoints

    p = cfg.pretrain
    init = random_init_model(cfg, seed)
    layer = probe_layer(cfg, init)
    row = {"probe": [{"step": 0, **probe_checkpoint(init, *probe, layer=layer, alpha=float(cfg.probe.alpha))}],
           "layer": layer}
    if arm == "none":
        return {**row, "run_dir": None, "steps": 0, "train_s": 0.0, "flops_per_step": 0.0, "validation": []}
    run_dir = os.path.join(out, "runs", f"pretrain_{arm}_seed{seed}")
    overrides = ["dataset=store", f"data_dir={corpus}", f"clip.image_size={_size(cfg)}", *_model(cfg),
                 f"objective={arm}", f"run_dir={run_dir}", f"trainer.seed={seed}",
                 *_trainer(p, cfg, int(p.checkpoint_every)), *(cfg.repa_overrides if arm == "repa" else []),
                 *p.overrides]
    print(f"[pretraining_study] pretrain {arm} seed {seed}: {p.steps} steps -> {run_dir}", file=sys.stderr, flush=True)
    t = time.time()
    run_training(cli.compose("pretrain", overrides), "pretrain")
    train_s = time.time() - t
    for ckpt in list_checkpoints(run_dir):
        model, _ = load_checkpoint_model(ckpt)
        row["probe"].append({"step": int(ckpt.name.split("_")[1]),
                             **probe_checkpoint(model, *probe, layer=layer, alpha=float(cfg.probe.alpha))})
    return {**row, "run_dir": run_dir, "steps": int(p.steps), "train_s": round(train_s, 1), "validation": _validation_rows(run_dir),
            "flops_per_step": flops_per_step(run_dir)}


def _records(eval_dir: str) -> dict:
    from .evaluation.records import load_records

    return {r["key"]: float(bool(r["success"])) for r in load_records(eval_dir) if "success" in r}


def evaluate_checkpoint(cfg, ckpt: str, eval_dir: str, mode: str) -> dict:
    """Roll out one checkpoint on the shared env seeds; per-episode success keyed by task|seed."""
    from .evaluate import evaluate
    from .quickstart import _evaluate

    s = evaluate([*_evaluate(cfg, ckpt, eval_dir), f"policy_kwargs.mode={mode}", "videos_per_task=0"])
    errors = int((s.get("throughput") or {}).get("errors") or 0)
    if not s.get("complete", True) or errors:
        return {"error": f"{s.get('episodes', 0)} of {s.get('episodes_expected')} episodes finished, {errors} failed "
                         f"(records in {eval_dir})"}
    return {"success": s["mean_success"], "episodes": _records(eval_dir)}


def finetune_arm(cfg, arm: str, seed: int, demos: int, init: str | None, out: str, heldout) -> dict:
    """Fine-tune from the arm's backbone with the study's one fine-tuning objective, then measure."""
    from .jobs import run_training
    from .study_metrics import rollout_quality
    from .train.checkpoint import list_checkpoints

    f = cfg.finetune
    name = f"finetune_{arm}_seed{seed}_demos{demos}"
    run_dir = os.path.join(out, "runs", name)
    overrides = [*_demo_dataset(cfg, out, demos), *_model(cfg), f"objective={f.objective}",
                 f"objective.action_only_objective={f.action_only_objective}", "use_state=true",
                 f"init={init or 'none'}", f"run_dir={run_dir}", f"trainer.seed={seed}",
                 f"validation.fraction={f.validation_fraction}", *_trainer(f, cfg, int(f.checkpoint_every)), *f.overrides]
    print(f"[pretraining_study] fine-tune {arm} seed {seed}, {demos} demos/task -> {run_dir}", file=sys.stderr, flush=True)
    t = time.time()
    run_training(cli.compose("finetune", overrides), "finetune")
    train_s = time.time() - t
    ckpts = list_checkpoints(run_dir)
    success = []
    if int(cfg.evaluate.episodes_per_task) > 0:
        if cfg.evaluate.checkpoints == "last":
            ckpts_eval = ckpts[-1:]
        else:
            ckpts_eval = ckpts
        for i, ckpt in enumerate(ckpts_eval):
            modes = list(cfg.evaluate.modes) if i == len(ckpts_eval) - 1 else [cfg.evaluate.modes[0]]
            step = int(ckpt.name.split("_")[1])
            for mode in modes:
                res = evaluate_checkpoint(cfg, str(ckpt), os.path.join(out, "eval", name, ckpt.name, mode), mode)
                success.append({"step": step, "mode": mode, **res})
    r = cfg.rollout
    quality = rollout_quality(str(ckpts[-1]), heldout, range(min(int(r.episodes), len(heldout))), int(r.chunks),
                              int(r.steps), cfg.device) if int(r.episodes) > 0 else {}
    return {"demos": demos, "run_dir": run_dir, "train_s": round(train_s, 1), "eval_s": round(time.time() - t - train_s, 1),
            "validation": _validation_rows(run_dir), "success": success, **quality}


def check(cfg) -> None:
    """Refuse what would fail only after the data is collected and earlier arms have trained."""
    with open_dict(cfg):
        for key in ("arms", "seeds"):
            v = cfg[key]
            cfg[key] = [v] if isinstance(v, (str, int)) else list(v)
            if not cfg[key]:
                raise ValueError(f"pretraining_study option {key} is empty")
        for key in ("demos", "tasks"):
            v = cfg.target[key]
            cfg.target[key] = [v] if isinstance(v, (str, int)) else list(v)
    bad = [a for a in cfg.arms if a not in PRETRAIN_ARMS]
    if bad:
        raise ValueError(f"unknown arm(s) {bad}; arms= takes any of {list(PRETRAIN_ARMS)}")
    if len(set(cfg.arms)) != len(cfg.arms) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"arms and seeds must not repeat, got {list(cfg.arms)} and {list(cfg.seeds)}")
    if "repa" in cfg.arms and not any("encoder.weights=" in o for o in cfg.repa_overrides):
        raise ValueError("arm repa needs a frozen image encoder's weights on disk (no model hub is reached): pass "
                         "\"repa_overrides=['objective.encoder.kind=timm','objective.encoder.name=...',"
                         "'objective.encoder.weights=PATH.safetensors']\" or leave repa out of arms")
    if cfg.evaluate.checkpoints not in ("all", "last"):
        raise ValueError(f"evaluate.checkpoints must be all|last, got {cfg.evaluate.checkpoints!r}")
    if not set(cfg.evaluate.modes) <= {"action_first", "joint"} or not cfg.evaluate.modes:
        raise ValueError(f"evaluate.modes must be a non-empty subset of [action_first, joint], got {list(cfg.evaluate.modes)}")
    refuse_existing_study(cfg.out_dir, "pretraining_study_report")


def main(cfg) -> dict:
    from .data.store import EpisodeStore
    from .pretraining_study_report import write_report
    from .study_metrics import probe_data

    OmegaConf.resolve(cfg)
    check(cfg)
    out = start_study_dir(cfg)
    t0 = time.time()
    paths = build_data(cfg, out)
    heldout = EpisodeStore(paths["heldout"])
    probe = probe_data(heldout, cfg.image_size, int(cfg.probe.every))
    data_s = time.time() - t0
    runs: list[dict] = []
    try:
        for seed in cfg.seeds:
            for arm in cfg.arms:
                pre = pretrain_arm(cfg, arm, int(seed), out, paths["corpus"], probe)
                ft = [finetune_arm(cfg, arm, int(seed), int(n), pre["run_dir"], out, heldout) for n in cfg.target.demos]
                runs.append({"arm": arm, "seed": int(seed), "pretrain": pre, "finetune": ft,
                             "finished_s": round(time.time() - t0, 1)})
                write_json_atomic(os.path.join(out, "runs.json"), runs, indent=1)  # an interrupted study keeps these
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{len(runs)} (arm, seed) of {len(cfg.arms) * len(cfg.seeds)} finished and are kept in "
                                f"{os.path.join(out, 'runs.json')}; python -m selfflow_robot.pretraining_study_report "
                                f"{out} reports the seeds every arm finished") from None
    report = write_report(runs, out, OmegaConf.to_container(cfg, resolve=True),
                          wall_s=time.time() - t0, note=f"; data collection {data_s / 60:.1f} min")
    print(report["markdown"])
    print(f"[pretraining_study] report {report['md']}")
    return report


def cli_main(argv: list[str] | None = None) -> dict:
    cfg = cli.compose_argv("pretraining_study", sys.argv[1:] if argv is None else list(argv))
    with cli.reported_errors():
        return main(cfg)


if __name__ == "__main__":
    cli_main()
