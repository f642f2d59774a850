"""Rollout videos: mp4 through imageio-ffmpeg, or gif (no ffmpeg needed)."""
from __future__ import annotations

import os
import re

import numpy as np


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")


def write_video(path: str, frames: list, fps: int = 10) -> str:
    """Write frames (uint8 HxWx3) to `path` (.mp4 or .gif); falls back to .gif without ffmpeg."""
    import imageio.v2 as imageio

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    frames = [np.asarray(f, dtype=np.uint8) for f in frames]
    if path.endswith(".mp4"):
        try:
            # macro_block_size=1: keep odd/small sizes (e.g. 64x64) without resizing warnings.
            imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
            return path
        except Exception:  # no ffmpeg backend available
            path = path[:-4] + ".gif"
    imageio.mimwrite(path, frames, duration=1.0 / fps, loop=0)
    return path
