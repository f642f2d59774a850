"""Videos for people to look at (rollouts, predictions, dataset episodes): mp4 through
imageio-ffmpeg, or gif (no ffmpeg needed)."""
from __future__ import annotations

import os
import re

import numpy as np


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")


def per_episode_path(out: str, episode: int, several: bool) -> str:
    """`out` itself for one episode; `<stem>_ep<N><ext>` when a command writes several."""
    if not several:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}_ep{episode}{ext}"


MIN_HEIGHT = 256  # videos people watch: small policy frames are upscaled to at least this


def upscale(frames: np.ndarray, min_height: int = MIN_HEIGHT) -> np.ndarray:
    """Nearest-neighbour upscale by the smallest integer factor that reaches min_height
    (64x64 store frames play as a postage stamp otherwise); pixels stay exact."""
    k = max(1, -(-min_height // frames.shape[1]))
    return frames if k == 1 else frames.repeat(k, axis=1).repeat(k, axis=2)


def label_panels(frames: np.ndarray, labels: list[str]) -> np.ndarray:
    """Write each label in the top-left corner of its equal-width panel (frames [T, H, W, 3] uint8),
    white on a dark box so it reads on any picture."""
    from PIL import Image, ImageDraw

    out = np.array(frames, dtype=np.uint8, copy=True)
    width = out.shape[2] // len(labels)
    for t in range(len(out)):
        img = Image.fromarray(out[t])
        draw = ImageDraw.Draw(img)
        for i, text in enumerate(labels):
            x0, y0, x1, y1 = draw.textbbox((i * width + 4, 3), text)
            draw.rectangle((x0 - 2, y0 - 2, x1 + 2, y1 + 2), fill=(0, 0, 0))
            draw.text((i * width + 4, 3), text, fill=(255, 255, 255))
        out[t] = np.asarray(img)
    return out


VIDEO_FORMATS = (".mp4", ".gif")


def check_video_path(path: str, key: str = "out") -> str:
    """Refuse an extension this writer cannot produce before any work is done."""
    if not str(path).lower().endswith(VIDEO_FORMATS):
        raise ValueError(f"{key}={path}: videos are written as {' or '.join(VIDEO_FORMATS)}")
    return str(path)


def write_video(path: str, frames, fps: float = 10) -> str:
    """Write frames (uint8 HxWx3) to `path` (.mp4 or .gif); falls back to .gif without ffmpeg.
    Returns the path written."""
    import imageio.v2 as imageio

    check_video_path(path, "path")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    frames = [np.asarray(f, dtype=np.uint8) for f in frames]
    if path.lower().endswith(".mp4"):
        try:
            # macro_block_size=1: keep odd/small sizes (e.g. 64x64) without resizing warnings.
            imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
            return path
        except Exception:  # no ffmpeg backend available
            path = path[:-4] + ".gif"
    imageio.mimwrite(path, frames, duration=1.0 / fps, loop=0)
    return path
