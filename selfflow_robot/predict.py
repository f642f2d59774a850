"""`python -m selfflow_robot.predict policy=RUN episode=0 out=rollout.mp4`: world-model rollouts.

Takes the context frame(s) of a dataset episode and the episode's own actions, and lets the
fine-tuned video-action model generate the future frames chunk by chunk (clean actions given,
frames denoised; each chunk's last predicted frame becomes the next context). Writes an mp4 or gif
with the prediction beside the recorded frames, and prints how far the prediction is from the
recording (PSNR). `episode=[0,6,12]` scores several episodes: one video each and the mean PSNR.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from . import cli


def rollout(model, io: dict, normalizer, store, episode: int, start: int, chunks: int, steps: int, seed: int = 0,
            method: str = "ode"):
    """Returns (predicted, recorded) uint8 [N, H, W, 3] at the model's frame rate and image size."""
    from .sampling import predict_video, resize_frame

    size, stride, H = tuple(io["image_size"]), int(io["frame_stride"]), int(io["action_chunk"])
    n_ctx, n_fut = int(io["context_frames"]), int(io["future_frames"])
    length = store.episode_length(episode)
    if not 0 <= start < length - stride:  # the first predicted frame is `stride` steps after start
        raise ValueError(f"start={start}: episode {episode} has {length} steps and frames are {stride} apart, so "
                         f"start must be in 0..{length - stride - 1}")
    actions = store.actions(episode)
    instruction = store.instruction(episode)
    frame = lambda i: resize_frame(store.frames(episode, np.array([min(i, length - 1)]))[0], size)  # noqa: E731
    context = [frame(max(start - stride * k, 0)) for k in range(n_ctx - 1, -1, -1)]
    predicted, recorded = [], []
    g = torch.Generator(model.type_embed.device).manual_seed(seed)
    for c in range(chunks):
        t0 = start + c * n_fut * stride
        if t0 >= length - 1:
            break
        chunk = actions[np.minimum(np.arange(t0, t0 + H), length - 1)]
        norm = torch.as_tensor(normalizer.normalize(chunk) if normalizer else chunk, dtype=torch.float32)[None]
        out = predict_video(model, torch.stack(context)[None], instruction, n_fut, actions=norm, steps=steps, generator=g,
                            method=method)[0]
        future = [t for t in (t0 + stride * (k + 1) for k in range(n_fut)) if t < length]
        predicted += list(out[:len(future)])  # frames past the episode's end have no recording to compare with
        recorded += [frame(t) for t in future]
        context = (context + list(out))[-n_ctx:]
    return torch.stack(predicted).numpy(), torch.stack(recorded).numpy()


def psnr(predicted: np.ndarray, recorded: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 frames, in dB (higher is closer)."""
    mse = float(np.mean((predicted.astype(np.float64) - recorded.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main(cfg: DictConfig) -> dict:
    from .data import ActionNormalizer, EpisodeStore, open_store
    from .models import load_checkpoint_model
    from .train.checkpoint import resolve_checkpoint
    from .train.distributed import pick_device
    from .video import MIN_HEIGHT, check_video_path, label_panels, per_episode_path, upscale, write_video

    check_video_path(cfg.out)
    for key in ("chunks", "steps"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key}={cfg[key]}: must be at least 1")
    if OmegaConf.is_list(cfg.episode) and len(cfg.episode) == 0:
        raise ValueError("episode=[] names no episode: give an index or a list such as [0,6,12]")
    device = pick_device(cfg.device)
    ckpt = resolve_checkpoint(cfg.policy)
    model, config = load_checkpoint_model(ckpt, device)
    io = config.get("io")
    if not io or model.action_head is None:
        raise ValueError(f"{ckpt}: not a fine-tuned video-action model (no io section); predict needs actions")
    trained_store = (config.get("data") or {}).get("store")
    if cfg.get("dataset"):
        store = open_store(cfg.dataset)
    elif cfg.get("data_dir"):  # other data of the training data's kind: the run's dataset config, this folder
        dataset = OmegaConf.create(config["dataset"])
        with open_dict(dataset):
            dataset.data_dir = cfg.data_dir
            if "path" in dataset:
                dataset.path = cfg.data_dir
        store = open_store(dataset)
    elif trained_store and os.path.isdir(trained_store):  # the very store the model was trained on
        store = EpisodeStore(trained_store)
    else:
        store = open_store(OmegaConf.create(config["dataset"]))
    norm_file = ckpt / "normalization.json"
    normalizer = ActionNormalizer.load(norm_file) if norm_file.is_file() else None
    episodes = [int(e) for e in cfg.episode] if OmegaConf.is_list(cfg.episode) else [int(cfg.episode)]
    fps = float(cfg.fps or (io.get("fps") or 10) / int(io["frame_stride"]))
    bad = [e for e in episodes if not 0 <= e < len(store)]
    if bad:  # before any rollout is written
        raise ValueError(f"episode={bad[0]}: the store has episodes 0..{len(store) - 1}")
    scores = {}
    for episode in episodes:
        pred, real = rollout(model, io, normalizer, store, episode, int(cfg.start), int(cfg.chunks),
                             int(cfg.steps), int(cfg.seed), str(cfg.sampler))
        frames = upscale(np.concatenate([pred, real], axis=2), int(cfg.get("min_height") or MIN_HEIGHT))
        out = write_video(per_episode_path(cfg.out, episode, len(episodes) > 1),
                          label_panels(frames, ["prediction", "recorded"]), fps)
        scores[episode] = psnr(pred, real)
        short = len(pred) < int(cfg.chunks) * int(io["future_frames"])
        print(f"episode {episode}: wrote {len(pred)} frames (prediction | recorded) to {os.path.abspath(out)}; "
              f"PSNR {scores[episode]:.2f} dB" + (" (the episode ended before the last chunk)" if short else ""))
    mean = float(np.mean(list(scores.values())))
    if len(episodes) > 1:
        print(f"mean PSNR over {len(episodes)} episodes: {mean:.2f} dB ({cfg.sampler}, {cfg.steps} steps per chunk)")
    return {"psnr": scores, "mean_psnr": mean}


if __name__ == "__main__":
    cli.run("predict", main)
