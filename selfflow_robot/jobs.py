"""The training job shared by `pretrain` and `finetune`: data -> model -> objective -> Trainer."""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .cli import config_leaves, hydra_run_dir, to_container
from .threads import prefer_passive_openmp

prefer_passive_openmp()  # before torch is imported

log = logging.getLogger("selfflow_robot")


def resume_setting(cfg: DictConfig):
    """`resume=...` or, as docs/training.md also names it, `trainer.resume=...` (either turns it on)."""
    return cfg.get("resume") or cfg.get("trainer", {}).get("resume") or False


def resolve_run_dir(cfg: DictConfig, job: str) -> Path:
    """run_dir=..., else with resume=true the newest run of this job with a checkpoint, else Hydra's dir."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    root = Path("outputs") / job
    if resume_setting(cfg):
        runs = sorted((p for p in root.glob("*") if (p / "checkpoints" / "latest").is_file()),
                      key=lambda p: p.stat().st_mtime)
        if runs:
            log.info("resume=true: continuing %s", runs[-1])
            return runs[-1]
        raise FileNotFoundError(f"resume=true but no run with a checkpoint under {root}; pass run_dir=...")
    return Path(hydra_run_dir() or root / time.strftime("%Y-%m-%d_%H-%M-%S"))


# What a run's weights, data and optimisation depend on, and where it logs (a run started with
# wandb off stays off): a resume takes these from the run.
RUN_SECTIONS = ("model", "objective", "dataset", "clip", "data_dir", "use_state", "init", "trainer", "validation",
                "logger")
CONFIG_GROUPS = ("model", "objective", "dataset")


def command_line_keys() -> list[str] | None:
    """Dotted keys the command line set (`model.depth=3` -> model.depth, `dataset=rt1` -> dataset);
    None when not run from a command line (in-process compose)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = HydraConfig.get().overrides.task
    except Exception:
        return None
    return [o.split("=", 1)[0].lstrip("+~").split("@", 1)[0] for o in task]


_ABSENT = object()


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint a resume continues from (None: not resuming, or nothing saved yet)."""
    from .train.checkpoint import latest_checkpoint

    resume = resume_setting(cfg)
    if not resume:
        return None
    return latest_checkpoint(Path(resume) if isinstance(resume, str) and resume not in ("true", "True") else run_dir)


def with_run_settings(cfg: DictConfig, found: Path) -> DictConfig:
    """Resuming from checkpoint `found`: continue with the run's own settings (RUN_SECTIONS), so
    `finetune run_dir=X resume=true trainer.steps=N` needs none of the run's overrides again. What
    the command line sets wins; a group chosen there (`dataset=rt1`) replaces the whole section.
    The trainer then warns about what differs from the run."""
    from .train import checkpoint as ckpt

    given = command_line_keys()
    if given is None or not (found / "config.json").is_file():
        return cfg
    saved = ckpt.read_checkpoint_config(found)

    def set_on_command_line(key: str) -> bool:  # the key, a section above it, or a key below it
        return any(g == key or key.startswith(g + ".") or g.startswith(key + ".") for g in given)

    taken = []
    with open_dict(cfg):
        for section in (k for k in RUN_SECTIONS if k in saved and k not in given):
            value = saved[section]
            if section in CONFIG_GROUPS:  # the run's whole group (it may be another dataset than the default)
                mine = OmegaConf.create(value)
                for key in (g for g in given if g.startswith(section + ".")):
                    OmegaConf.update(mine, key[len(section) + 1:], OmegaConf.select(cfg, key), force_add=True)
                cfg[section] = mine
            elif isinstance(value, dict):  # plain settings: the run's, where this version still has the key
                for key, v in config_leaves(value, f"{section}."):
                    if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT and not set_on_command_line(key):
                        OmegaConf.update(cfg, key, v)
            else:
                cfg[section] = value
            taken.append(section)
    log.info("resume: %s as in %s, except what the command line sets", ", ".join(taken), found / "config.yaml")
    return cfg


def metaworld_settings(meta: dict) -> dict:
    """The env settings a Meta-World store was collected with (env keys of configs/env/metaworld.yaml)."""
    return {"tasks": list(meta.get("instructions") or []) or None, "camera": meta.get("camera"),
            "action_repeat": meta.get("action_repeat"), "image_size": list(meta["image_shape"][:2]),
            "state_mode": meta.get("state_mode")}


def open_dataset(cfg: DictConfig):
    """The episode store of cfg.dataset; a top-level data_dir=PATH fills the dataset's data_dir."""
    from .data import open_store

    if cfg.get("data_dir") is not None:
        with open_dict(cfg):
            cfg.dataset.data_dir = cfg.data_dir
    return open_store(cfg.dataset)


def _check_clip_fits(clip, store, finetune: bool) -> None:
    """Steps past an episode's end are masked out of the loss: a chunk longer than every episode
    would train a policy whose tail actions were never supervised, yet are executed."""
    longest = int(store.lengths.max()) if len(store) else 0
    if finetune and int(clip.action_chunk) > longest:
        raise ValueError(f"clip.action_chunk={clip.action_chunk} is longer than every episode (the longest has "
                         f"{longest} steps): actions past step {longest} would never be trained")
    reach = int(clip.future_frames) * int(clip.frame_stride)
    if reach >= longest > 0:
        warnings.warn(f"clip.future_frames={clip.future_frames} x clip.frame_stride={clip.frame_stride} reaches "
                      f"{reach} steps ahead, past the end of every episode (the longest has {longest} steps): "
                      "the last future frames are never real", stacklevel=2)


DEFAULT_CLIP_HEIGHT = 64


def _clip_image_size(size, stored_hw, patch: int, n_views: int, patch_desc: str | None = None) -> tuple[int, int]:
    """The trained frame size. null: at most 64 pixels high with the stored frames' aspect ratio
    (RT-1's 4:5 trains at 64x80), so nothing is squashed; a size given whose aspect differs gets a
    warning, since a policy then squashes the robot's frames the same way."""
    sh, sw = int(stored_hw[0]), int(stored_hw[1])
    patch_desc = patch_desc or f"model.patch_size={patch}"
    if size is None:
        unit = patch * max(n_views, 1)  # whole patches, none straddling two tiled views
        h = max(patch, min(DEFAULT_CLIP_HEIGHT, sh) // patch * patch)
        h, w = h, max(unit, round(h * sw / sh / unit) * unit)
    else:
        h, w = (int(x) for x in size)
        if h % patch or w % patch:
            raise ValueError(f"clip.image_size={[h, w]} is not divisible by {patch_desc}")
        if abs((h / w) / (sh / sw) - 1) > 0.1:
            warnings.warn(f"clip.image_size={[h, w]} squashes the stored {sh}x{sw} frames (aspect {h / w:.2f} vs "
                          f"{sh / sw:.2f}); clip.image_size=null keeps the data's aspect ratio", stacklevel=2)
    tokens = (h // patch) * (w // patch)
    if tokens < 4:  # e.g. 64 px frames, patch 8 of an 8x-downsampling autoencoder: one token a frame
        warnings.warn(f"frames of {h}x{w} with {patch_desc} give {tokens} token(s) per frame: the model sees "
                      "almost no layout; a smaller model.patch_size or a larger clip.image_size gives more", stacklevel=2)
    return h, w


def cached_latents(clip, trainer_cfg, store, model, image_size, ranks, resuming_from=None):
    """clip.cached_latents=true: the store's frames encoded once by the model's frozen autoencoder
    (data/latent_cache.py), resuming a cache a killed run left; None when the setting is off."""
    setting = clip.get("cached_latents", False)
    if not isinstance(setting, bool):  # `off` or `yes` from the command line are strings, and truthy
        raise ValueError(f"clip.cached_latents={setting!r}: must be true or false")
    if not setting:
        return None
    from .data.latent_cache import cache_bytes, encode_store, human_bytes, open_cache
    from .train.distributed import barrier

    if model.autoencoder is None:
        raise ValueError("clip.cached_latents=true caches autoencoder latents: it needs model.autoencoder=DIR")
    ae = model.autoencoder
    if resuming_from is not None:  # the trainer restores the run's own autoencoder: encode with that one
        _load_saved_autoencoder(ae, resuming_from)
    precision = str(trainer_cfg.get("precision", "auto"))
    if precision == "auto":  # the trainer's rule: the step would encode under the same autocast
        precision = "bf16" if ranks.device.type == "cuda" else "fp32"
    root = clip.get("cached_latents_dir") or None
    cache = encode_store(store, ae, image_size, ranks.device, batch=int(clip.get("cached_latents_batch", 32)),
                         rank=ranks.rank, world_size=ranks.world_size, progress=ranks.is_main, precision=precision,
                         root=root, source=(model.cfg.autoencoder or {}).get("path"))
    barrier()  # every rank's shards are written
    ae.to("cpu")  # the model is moved to the device, whole, by the trainer
    if cache is None:  # several ranks each wrote a share: check the whole
        cache = open_cache(store, ae, image_size, root)
    if cache is None:
        raise RuntimeError(f"clip.cached_latents: the latent cache of {store.path} is incomplete after encoding")
    log.info("data: cached latents %s (%s float16 per frame, %s)", cache.path,
             "x".join(map(str, cache.latent_shape)), human_bytes(cache_bytes(cache)))
    return cache


def _load_saved_autoencoder(ae, checkpoint) -> None:
    """The frozen autoencoder's tensors from a checkpoint's model.safetensors (read alone, not the model)."""
    from safetensors import safe_open

    with safe_open(str(Path(checkpoint) / "model.safetensors"), framework="pt") as f:
        saved = {k[len("autoencoder."):]: f.get_tensor(k) for k in f.keys() if k.startswith("autoencoder.")}
    if saved:
        ae.load_state_dict(saved)


def check_memory(tcfg, model, objective, loader, train_set, ranks) -> None:
    """Refuse, before the first step, a run whose estimated memory exceeds what the device has
    (trainer.memory_check=false skips it); the error names settings that fit."""
    import torch

    from .train.distributed import resolve_parallel
    from .train.memory import TooLarge, estimate, explain
    from .train.trainer import check_config, move_to_device

    t = check_config(tcfg)
    device = ranks.device
    model.to(device)
    if isinstance(objective, torch.nn.Module):
        objective.to(device)
    sample = move_to_device((loader.collate_fn or (lambda x: x))([train_set[0]]), device)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")

    def run_estimate(checkpointing: bool):
        return estimate(model, objective, sample, batch_size=int(t.batch_size), accum=int(t.grad_accum_steps),
                        world=ranks.world_size, device=device, parallel=resolve_parallel(t.parallel, ranks),
                        checkpointing=checkpointing,
                        step_context=(lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else None)

    est = run_estimate(bool(t.activation_checkpointing))
    log.info("memory: ~%.2f GiB estimated for the run, %.1f GiB available on %s", est.need / 2**30,
             est.available / 2**30, device)
    if not est.fits:
        checkpointed = None if t.activation_checkpointing else run_estimate(True)
        raise TooLarge(explain(est, int(t.batch_size), int(t.grad_accum_steps), ranks.world_size, checkpointed))


def run_training(cfg: DictConfig, job: str) -> dict:
    """Build everything from the composed config and train. Returns the trainer summary. Ctrl-C
    ends with a line that says what this run has on disk (cli.reported_errors prints it)."""
    where: dict = {}
    try:
        return _run_training(cfg, job, where)
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(interrupted_message(where.get("run_dir"), cfg)) from e


def interrupted_message(run_dir: Path | None, cfg: DictConfig) -> str:
    """What a stopped training run kept: the last checkpoint and how to continue, or that there is
    none yet (a resume would then find nothing)."""
    from .train.checkpoint import latest_checkpoint

    if run_dir is None:
        return ("stopped before training started; nothing to resume (episodes already converted into the "
                "dataset's store are kept, and the same command continues the conversion)")
    found = latest_checkpoint(run_dir)
    resumed = resume_checkpoint(cfg, run_dir) if found is None else None
    if resumed is not None:  # resume=PATH of another run: nothing new here, the same command resumes again
        return (f"no checkpoint was written yet in {run_dir}; the same command resumes from {resumed} again")
    if found is None:
        every = int(cfg.trainer.get("checkpoint_every", 0) or 0)
        first = f"the first is written at step {every} (trainer.checkpoint_every)" if every else \
            "trainer.checkpoint_every=0 saves only at the end"
        return (f"no checkpoint was written yet ({first}): nothing to resume; {run_dir} holds the logs only, "
                f"and the same command starts again from step 0")
    return (f"the last checkpoint is {found} (kept); the same command with run_dir={run_dir} resume=true "
            f"continues from it")


def _run_training(cfg: DictConfig, job: str, where: dict) -> dict:
    import torch

    from .data import ActionNormalizer, ClipDataset
    from .data.errors import DataError
    from .models import build_model, model_config
    from .models.loading import load_backbone, load_objective_head
    from .objectives import build_objective
    from .train import Trainer
    from .train.loader import make_loader
    from .train.distributed import agree_on_path, init_distributed
    from .train.trainer import check_config
    from .validation import Validator, split_episodes

    check_config(cfg.trainer)  # refuses bad trainer keys before data loading
    finetune = job == "finetune"
    ranks = init_distributed(str(cfg.trainer.get("device", "auto")))
    if not ranks.is_main:  # under torchrun rank 0 reports; the others speak only to warn
        log.setLevel(logging.WARNING)
    run_dir = where["run_dir"] = agree_on_path(resolve_run_dir(cfg, job), ranks)
    resuming_from = resume_checkpoint(cfg, run_dir)
    if resuming_from is not None:
        cfg = with_run_settings(cfg, resuming_from)
    accum = int(check_config(cfg.trainer).grad_accum_steps)  # after a resume took the run's trainer settings
    clip = cfg.clip
    # settings refused before the data (a conversion can take long) and the model are built
    if int(cfg.get("validation", {}).get("sampler_steps", 10)) < 1:
        raise ValueError(f"validation.sampler_steps={cfg.validation.sampler_steps}: must be at least 1")
    if int(clip.future_frames) < 1:  # the video stream is what pretraining learns and fine-tuning keeps
        raise ValueError(f"clip.future_frames={clip.future_frames}: the model generates at least one future frame")
    store = open_dataset(cfg)
    action_dim = int(store.meta["action_dim"]) if finetune else 0
    if finetune and action_dim == 0:
        raise ValueError(f"dataset {cfg.dataset.get('name')} has no actions; fine-tuning needs an action-labelled store")
    if finetune and int(clip.action_chunk) < 1:
        raise ValueError(f"clip.action_chunk={clip.action_chunk}: a video-action model needs at least one action "
                         "per chunk (to train video alone, use pretrain)")
    _check_clip_fits(clip, store, finetune)
    state_dim = int(store.meta.get("state_dim") or 0) if finetune and cfg.get("use_state") else 0
    if finetune and cfg.get("use_state") and not state_dim:
        warnings.warn(f"use_state=true but the store {store.path} records no state: the policy takes none", stacklevel=2)
    mcfg = model_config(to_container(cfg.model), action_dim=action_dim, state_dim=state_dim,
                        frame_stride=int(clip.frame_stride))
    if mcfg.text == "embedding" and not store.meta.get("embedding_dim"):
        raise ValueError("model.text=embedding but the dataset store has no instruction embeddings")
    if mcfg.text == "embedding":
        mcfg.text_embed_dim = int(store.meta["embedding_dim"])
    views = list(store.meta.get("views") or [])
    stored_hw = store.meta["image_shape"][:2]
    # Pixels per token side: a patch of the autoencoder's latent covers `downsample` times more.
    downsample = int((mcfg.autoencoder or {}).get("downsample", 1))
    pixel_patch = mcfg.patch_size * downsample
    patch_desc = (f"model.patch_size {mcfg.patch_size} x the autoencoder's downsample {downsample} = {pixel_patch}"
                  if downsample > 1 else f"model.patch_size={pixel_patch}")
    image_size = _clip_image_size(clip.image_size, stored_hw, pixel_patch, len(views), patch_desc)
    if len(views) > 1 and image_size[1] % (len(views) * pixel_patch):  # no patch may straddle two views
        raise ValueError(f"the store tiles {len(views)} camera views side by side ({views}): clip.image_size="
                         f"{list(image_size)} needs a width of {len(views)} x (a multiple of {patch_desc})")
    patch_values = mcfg.patch_size**2 * mcfg.in_channels
    if mcfg.video_prediction == "v" and patch_values > mcfg.width:
        # Measured on the quickstart (768 into 128): velocity prediction never generated frames.
        warnings.warn(f"model.video_prediction=v with {patch_values}-value patches into width {mcfg.width}: the "
                      f"velocity carries full-rank noise through a narrower model, and frame generation may fail; "
                      f"model.video_prediction=x predicts clean patches instead (docs/model.md)", stacklevel=2)

    train_eps, val_eps = split_episodes(len(store), float(cfg.get("validation", {}).get("fraction", 0.1)),
                                        seed=int(cfg.trainer.seed))
    normalizer = None
    if finetune:
        norm_cfg = cfg.dataset.get("normalization") or {}
        normalizer = ActionNormalizer.from_store(store, mode=norm_cfg.get("mode", "q99"), mask=norm_cfg.get("mask"),
                                                 episodes=train_eps)
        if val_eps:  # a NaN there would only show as val_flow_loss nan: name it, as in a training episode
            try:
                store.stats(val_eps)
            except DataError as e:
                raise DataError(f"held-out validation episode: {e}") from None

    torch.manual_seed(int(cfg.trainer.seed))
    model = build_model(mcfg)
    if cfg.get("init") not in (None, "none", "") and resuming_from is None:
        # (a resume loads every weight from its checkpoint: the init checkpoint need not exist any more)
        created = load_backbone(model, cfg.init)
        log.info("init=%s; new layers: %s", cfg.init, sorted({k.split(".")[0] for k in created}) or "none")
    latents = cached_latents(clip, cfg.trainer, store, model, image_size, ranks, resuming_from)

    def clips(episodes, train=True):
        # REPA's encoder targets are frames, so its training clips keep them beside the latents
        return ClipDataset(store, context_frames=clip.context_frames, future_frames=clip.future_frames,
                           frame_stride=clip.frame_stride, action_chunk=clip.action_chunk if finetune else 0,
                           image_size=image_size, normalizer=normalizer, episodes=episodes,
                           latents=latents if train else None,
                           frames=not (train and latents) or cfg.objective.get("kind") == "repa")

    train_set = clips(train_eps)
    log.info("data: %s: %d episodes (%d steps; %d train, %d validation), trained at %dx%d (stored %dx%d)",
             store.path, len(store), store.num_steps, len(train_eps), len(val_eps), *image_size, *stored_hw)
    # no more loader processes than cores (torch warns about, and a small machine pays for, more)
    workers = min(int(cfg.trainer.num_workers), os.cpu_count() or 1)
    loader = make_loader(train_set, int(cfg.trainer.batch_size), num_workers=workers,
                         seed=int(cfg.trainer.seed), grad_accum_steps=accum)

    objective = build_objective(to_container(cfg.objective), mcfg)
    if cfg.get("init") not in (None, "none", "") and resuming_from is None and load_objective_head(objective, cfg.init):
        log.info("init=%s: Self-Flow projection head loaded from its objective.safetensors", cfg.init)
    if check_config(cfg.trainer).memory_check:
        check_memory(cfg.trainer, model, objective, loader, train_set, ranks)

    validator = None
    if val_eps:
        # The same clips in the same batches whatever the accumulation or the number of ranks, so
        # runs that differ only in those report comparable numbers (no gradients: it fits where
        # a training micro-batch does)
        batch, world = int(cfg.trainer.batch_size), ranks.world_size
        val_loader = make_loader(clips(val_eps, train=False), batch if batch <= 32 else max(world, 32 // world * world),
                                 num_workers=0, seed=1, shuffle=True, drop_last=False)
        v = cfg.get("validation", {})
        validator = Validator(val_loader, int(v.get("batches", 4)), mcfg, objective.cfg.context_noise_max,
                              sampler_steps=int(v.get("sampler_steps", 10)))

    config = to_container(cfg)
    config["model"] = mcfg.to_dict()
    config["job"] = job
    config["data"] = {"episodes": len(store), "train_episodes": len(train_eps), "val_episodes": len(val_eps),
                      "clips": len(train_set), "store": os.path.abspath(store.path),
                      "latents": latents.path if latents else None}
    if store.meta.get("source") == "metaworld":  # how the demos were rendered: evaluate rolls out the same way
        config["data"]["metaworld"] = metaworld_settings(store.meta)
    extra = {}
    if finetune:
        config["io"] = {"image_size": list(image_size), "data_image_size": list(stored_hw),
                        "context_frames": int(clip.context_frames),
                        "future_frames": int(clip.future_frames), "frame_stride": int(clip.frame_stride),
                        "action_chunk": int(clip.action_chunk), "action_dim": action_dim, "state_dim": state_dim,
                        "fps": store.meta.get("fps"), "text": mcfg.text,
                        "action_names": store.meta.get("action_names"), "views": views if len(views) > 1 else None}
        extra["normalization.json"] = normalizer.to_dict()
    every = int(cfg.get("validation", {}).get("every", 0))
    trainer = Trainer(cfg.trainer, model, objective, loader, run_dir, config=config, extra_files=extra,
                      eval_fn=validator, eval_every=every or int(cfg.trainer.steps), logger_cfg=cfg.logger,
                      resume=resume_setting(cfg))
    summary = trainer.fit()
    summary["run_dir"] = str(run_dir)
    if validator is not None:  # the trainer's final pass, unless it had nothing left to train
        done = validator.last is not None and validator.last[0] == trainer.step
        summary["validation"] = validator.last[1] if done else validator(trainer.ema_model, trainer.step)
    if not trainer.dist.is_main:  # every rank holds the same summary; one prints it
        return summary
    log.info("done: %s", summary)
    val = summary.get("validation") or {}
    print(f"run: {run_dir}\ncheckpoint: {summary.get('checkpoint')}\nmetrics: {summary.get('metrics_path')}"
          + (f"\ncurves: {summary['curves_path']}" if summary.get("curves_path") else "")
          + ("\nvalidation (EMA weights): " + ", ".join(f"{k} {float(v):.4g}" for k, v in val.items()) if val else ""))
    return summary
