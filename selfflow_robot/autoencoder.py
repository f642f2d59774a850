"""`python -m selfflow_robot.autoencoder dataset=... out=DIR`: train the optional frame autoencoder.

Reconstruction (L1 + L2) of single frames from any dataset, with the shared trainer (progress bar,
metrics, checkpoints, resume). At the end the EMA weights and the latent scale (1 / std of the
latents over some training frames) are written to DIR; use them with `model.autoencoder=DIR`.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from . import cli
from .jobs import open_dataset, resolve_run_dir, resume_setting
from .models.autoencoder import FrameAutoencoder
from .models.tokens import frames_to_float


def reconstruction_loss(model, ema_model, batch):
    x = frames_to_float(batch["context"].to(next(model.parameters()).device)).flatten(0, 1).permute(0, 3, 1, 2)
    rec = model(x)
    l1, l2 = F.l1_loss(rec, x), F.mse_loss(rec, x)
    return l1 + l2, {"l1": l1.detach(), "mse": l2.detach()}


@torch.no_grad()
def latent_scale(ae: FrameAutoencoder, loader, batches: int = 8) -> float:
    zs = []
    for _, batch in zip(range(batches), loader):
        x = frames_to_float(batch["context"]).flatten(0, 1).permute(0, 3, 1, 2)
        zs.append(ae.encoder(x.to(ae.scale.device)).flatten())
    return float(1.0 / torch.cat(zs).std().clamp_min(1e-6))


def main(cfg: DictConfig) -> dict:
    from .data import ClipDataset
    from .train import Trainer
    from .train.loader import make_loader

    if not cfg.get("out"):
        raise ValueError("autoencoder: out=DIR is required (where config.json + model.safetensors go)")
    store = open_dataset(cfg)
    frames = ClipDataset(store, context_frames=1, future_frames=0, action_chunk=0, image_size=tuple(cfg.image_size))
    loader = make_loader(frames, int(cfg.trainer.batch_size), num_workers=int(cfg.trainer.num_workers),
                         seed=int(cfg.trainer.seed), grad_accum_steps=int(cfg.trainer.get("grad_accum_steps", 1)))
    torch.manual_seed(int(cfg.trainer.seed))
    ae = FrameAutoencoder(int(cfg.channels), int(cfg.width), int(cfg.downsample))
    run_dir = resolve_run_dir(cfg, "autoencoder")
    trainer = Trainer(cfg.trainer, ae, reconstruction_loss, loader, run_dir, config=cli.to_container(cfg),
                      logger_cfg=cfg.logger, resume=resume_setting(cfg))
    summary = trainer.fit()
    final = trainer.ema_model.cpu()
    final.scale.fill_(latent_scale(final, make_loader(frames, 16, seed=1)))
    final.save(cfg.out)
    print(f"autoencoder: {os.path.abspath(cfg.out)} (latent scale {float(final.scale):.4f}); use model.autoencoder={cfg.out}")
    return {**summary, "out": os.path.abspath(cfg.out), "scale": float(final.scale)}


if __name__ == "__main__":
    cli.run("autoencoder", main)
