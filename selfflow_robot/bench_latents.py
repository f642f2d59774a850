"""`python -m selfflow_robot.bench latents`: can the data path keep a training step on SD-VAE latents fed?

Training on SD-VAE latents of RT-1-sized frames (256x320 -> 32x40x4; patch 2: 16x20 = 320 tokens a
frame) has three costs, measured apart and then as one step, on one device:

store   episode store -> ClipDataset -> the trainer's DataLoader with W workers: clips/s (CPU work,
        one figure per worker count; worker start-up excluded)
encode  the frozen SD-VAE encoder on one batch of clips' frames: clips/s (bf16 autocast on CUDA)
cache   `clip.cached_latents=true`'s one-off encoding of the whole store (data/latent_cache.py):
        frames/s and bytes on disk against the frames'; then the cached store -> loader clips/s
step    the trainer's flow-matching step on that batch, from uint8 frames (the encoder runs inside
        the step: what `model.autoencoder=DIR` trains with) and from cached latents of the same
        clips (what `clip.cached_latents=true` feeds): clips/s and the encoder's share

The SD-VAE is `latents.autoencoder` (a diffusers AutoencoderKL folder), or by default its
architecture (sd-vae-ft-ema's config) with random weights: the cost does not depend on the weights.
The summary line says how many loader workers keep each step fed at the measured rates (without
diffusers there is no SD-VAE: the latent step then takes random tokens and the frame loader's rate).
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
from omegaconf import DictConfig

from . import cli
from .bench import _device_name, _middle, _time_steps, emit
from .data.store import EpisodeStore

# The public SD-VAE (stabilityai/sd-vae-ft-ema) architecture: 8x down, 4 latent channels.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                     block_out_channels=[128, 256, 512, 512], act_fn="silu", sample_size=256,
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                     scaling_factor=0.18215)


def write_frame_store(path: str, episodes: int, steps: int, image_size, seed: int = 0) -> str:
    """Episodes of RT-1-sized frames (8-pixel blocks of random colour, shifted a block per step) with 7-d actions."""
    from .data.store import EpisodeWriter

    h, w = image_size
    rng = np.random.default_rng(seed)
    meta = {"source": "bench_latents", "fps": 3, "image_shape": [h, w, 3], "action_dim": 7,
            "action_names": [f"a{i}" for i in range(7)]}
    with EpisodeWriter(path, meta=meta, resume=False) as writer:
        for ep in range(episodes):
            base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
            frames = np.stack([np.kron(np.roll(base, k, axis=1)[:h // 8, :w // 8], np.ones((8, 8, 1)))
                               for k in range(steps)]).astype(np.uint8)
            writer.add(key=f"ep{ep}", images=frames, actions=rng.normal(size=(steps, 7)).astype(np.float32),
                       instruction="pick coke can")
    return path


def _loader_rate(dataset, batch: int, workers: int, batches: int) -> float:
    """Clips per second through the trainer's DataLoader, after its first batch (worker start-up)."""
    from .train.loader import make_loader

    loader = make_loader(dataset, batch, num_workers=workers, seed=0, pin_memory=False)
    if len(loader) < 2:
        raise ValueError(f"latents: the store holds {len(dataset)} clips, too few for batches of {batch} "
                         "(raise latents.episodes or latents.steps_per_episode)")
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(min(batches, len(loader) - 1)):  # one epoch at most: no second worker start-up
        n += len(next(it)["future_mask"])
    return n / (time.perf_counter() - t0)


def _sd_vae_spec(path: str | None) -> dict:
    from .models.autoencoder import autoencoder_spec

    if path:
        return autoencoder_spec(path)
    return dict(kind="diffusers_kl", channels=4, downsample=8, scale=SD_VAE_CONFIG["scaling_factor"], shift=0.0,
                config=dict(SD_VAE_CONFIG))


def _trainer(cfg, device, autoencoder: dict | None, run_dir: str, batch: int):
    import torch

    from .models import build_model
    from .objectives import build_objective
    from .train import Trainer

    torch._dynamo.reset()
    torch.manual_seed(0)
    extra = {"autoencoder": autoencoder} if autoencoder else {"in_channels": 4}
    model = build_model(cli.to_container(cfg.model), patch_size=2, text="none", action_dim=7, **extra)
    objective = build_objective({"kind": "flow_matching"}, model.cfg)
    tcfg = {"steps": 10**9, "batch_size": batch, "compile": bool(cfg.latents.compile), "device": device.type,
            "warmup_steps": 0, "checkpoint_every": 0, "log_every": 10**9, "num_workers": 0}
    return Trainer(tcfg, model, objective, [], run_dir, logger_cfg={"wandb": "disabled", "jsonl": False,
                                                                        "progress_bar": False})


def _cache(b, base, store, ae, image_size, device, frames, batch, rates) -> dict:
    """Encode the store once as clip.cached_latents=true does; time it and the cached loader."""
    import torch

    from .data.clips import ClipDataset
    from .data.latent_cache import encode_store

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    episodes = EpisodeStore(store)
    precision = "bf16" if device.type == "cuda" else "fp32"  # as clip.cached_latents encodes with trainer.precision=auto
    sync()
    t0 = time.perf_counter()
    cache = encode_store(episodes, ae, image_size, device, batch=int(b.encode_batch), progress=False,
                         precision=precision)
    sync()
    seconds = time.perf_counter() - t0
    n_frames = episodes.num_steps
    emit({**base, "part": "cache", "precision": precision, "frames_encoded": n_frames, "seconds": seconds, "frames_per_s": n_frames / seconds,
          "bytes_per_frame": int(np.prod(cache.latent_shape)) * 2, "frame_bytes": int(np.prod(image_size)) * 3}, b.out)
    cached_set = ClipDataset(episodes, context_frames=1, future_frames=frames - 1, action_chunk=6, latents=cache,
                             frames=False)
    for workers in b.workers:
        rates[int(workers)] = _loader_rate(cached_set, batch, int(workers), int(b.loader_batches))
        emit({**base, "part": "store", "input": "latents", "workers": int(workers),
              "clips_per_s": rates[int(workers)], "cpus": os.cpu_count()}, b.out)
    collate = torch.utils.data.default_collate([cached_set[i] for i in range(batch)])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate.items()}


def bench_latents(cfg: DictConfig) -> dict:
    import torch

    from .data.clips import ClipDataset

    b = cfg.latents
    device = torch.device("cuda" if torch.cuda.is_available() and b.device != "cpu" else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    h, w = (int(x) for x in b.image_size)
    frames, batch = int(b.frames), int(b.batch)
    base = {"bench": "latents", "device": _device_name(device), "image_size": [h, w], "frames": frames, "batch": batch}
    with tempfile.TemporaryDirectory() as tmp:
        store = write_frame_store(os.path.join(tmp, "store"), int(b.episodes), int(b.steps_per_episode), (h, w))
        dataset = ClipDataset(store, context_frames=1, future_frames=frames - 1, action_chunk=6)
        loader = {}
        for workers in b.workers:
            loader[int(workers)] = _loader_rate(dataset, batch, int(workers), int(b.loader_batches))
            emit({**base, "part": "store", "input": "frames", "workers": int(workers), "clips_per_s": loader[int(workers)],
                  "cpus": os.cpu_count()}, b.out)

        collate = torch.utils.data.default_collate([dataset[i] for i in range(batch)])
        frame_batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate.items()}
        spec = _sd_vae_spec(b.autoencoder)
        down = 2 * int(spec["downsample"])  # pixels per token side: the VAE's downsample x patch 2
        latent_shape = (h // down, w // down, 4 * int(spec["channels"]))
        try:
            with_encoder = _trainer(cfg, device, spec, os.path.join(tmp, "enc"), batch)
        except ImportError as e:  # diffusers missing: the store and cached-latent figures still come
            print(f"latents: no SD-VAE encoder ({e}); measuring the cached-latent step only", flush=True)
            with_encoder = None
        steps, cached_loader = {}, {}
        if with_encoder is not None:
            ae, model = with_encoder.model.autoencoder, with_encoder.model
            pixels = frame_batch["future"]

            def encode():
                with torch.no_grad(), with_encoder._step_context():
                    model.frames_to_tokens(pixels)
                    model.frames_to_tokens(frame_batch["context"])

            t_enc = _time_steps(encode, int(b.warmup), int(b.reps), device)
            emit({**base, "part": "encode", "autoencoder": b.autoencoder or "sd-vae architecture, random weights",
                  "clips_per_s": batch / t_enc, "frames_per_s": batch * frames / t_enc,
                  "encoder_mparams": sum(p.numel() for p in ae.parameters()) / 1e6}, b.out)
            steps["frames"] = _time_steps(lambda: with_encoder._train_step(frame_batch), int(b.warmup), int(b.reps),
                                          device)
            latent_batch = _cache(b, base, store, ae, (h, w), device, frames, batch, cached_loader)
            # the same model (its encoder idle): what clip.cached_latents=true trains
            steps["latents"] = _time_steps(lambda: with_encoder._train_step(latent_batch), int(b.warmup),
                                           int(b.reps), device)
            model_name = model.cfg.name
            del with_encoder, model, ae
        else:
            cached = _trainer(cfg, device, None, os.path.join(tmp, "cached"), batch)
            token_batch = {**{k: v for k, v in frame_batch.items() if k not in ("future", "context")},
                           "video_tokens": torch.randn(batch, frames - 1, *latent_shape, device=device),
                           "context_tokens": torch.randn(batch, 1, *latent_shape, device=device)}
            steps["latents"] = _time_steps(lambda: cached._train_step(token_batch), int(b.warmup), int(b.reps), device)
            model_name = cached.model.cfg.name
        tokens = frames * int(np.prod(latent_shape[:2]))
        for source, step_s in steps.items():
            emit({**base, "part": "step", "input": source, "model": model_name, "tokens": tokens,
                  "step_s": step_s, "clips_per_s": batch / step_s}, b.out)
    rates = {"frames": loader, "latents": cached_loader or loader}
    # loader workers that deliver what each step consumes, at the median per-worker rate of its input
    per_worker = {k: _middle([r[w] / max(w, 1) for w in r]) for k, r in rates.items()}
    summary = {**base, "part": "summary", "store_clips_per_s": {str(k): v for k, v in loader.items()},
               "cached_store_clips_per_s": {str(k): v for k, v in cached_loader.items()} or None,
               "step_clips_per_s": {k: batch / v for k, v in steps.items()},
               "encoder_share_of_step": 1 - steps["latents"] / steps["frames"] if "frames" in steps else None,
               "workers_needed": {k: math.ceil(batch / v / per_worker[k]) for k, v in steps.items()},
               "fed": {k: max(rates[k].values()) >= batch / v for k, v in steps.items()}}
    emit(summary, b.out)
    return summary
