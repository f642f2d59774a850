"""A folder of videos or images as an action-free episode store (pretraining data).

Videos (mp4, avi, mov, mkv, webm, gif; read with imageio/ffmpeg) are cut into clips of
`clip_frames` frames (every `frame_skip`-th frame); each folder of images is one sequence in
file-name order, cut the same way. Frames are centre-cropped to the target aspect ratio and
resized, so nothing is stretched. Episodes have 0-d actions.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import DataError, SkipLog

VIDEO_EXT = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def fit(frame: np.ndarray, size) -> np.ndarray:
    """Centre-crop to the aspect ratio of `size` (h, w), then resize."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, -1)
    frame = frame[..., :3].astype(np.uint8, copy=False)
    fh, fw = frame.shape[:2]
    if fh * w > fw * h:  # too tall
        ch = max(1, round(fw * h / w))
        top = (fh - ch) // 2
        frame = frame[top:top + ch]
    else:
        cw = max(1, round(fh * w / h))
        left = (fw - cw) // 2
        frame = frame[:, left:left + cw]
    if frame.shape[:2] == (h, w):
        return np.ascontiguousarray(frame)
    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((w, h), Image.BILINEAR))


def list_sources(folder: str) -> list[tuple[str, str]]:
    """[(kind, path)]: each video file, and each directory holding images, sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        files = sorted(files)
        out += [("video", os.path.join(root, f)) for f in files if f.lower().endswith(VIDEO_EXT)]
        if any(f.lower().endswith(IMAGE_EXT) for f in files):
            out.append(("images", root))
    return out


def _frames(kind: str, path: str):
    if kind == "video":
        import imageio.v2 as imageio

        with imageio.get_reader(path) as reader:
            yield from reader
    else:
        from PIL import Image

        for f in sorted(os.listdir(path)):
            if f.lower().endswith(IMAGE_EXT):
                with Image.open(os.path.join(path, f)) as im:
                    yield np.asarray(im.convert("RGB"))


def convert_video_folder(folder: str, out: str, image_size=(128, 128), clip_frames: int = 32, frame_skip: int = 1,
                         max_episodes: int | None = None, on_error: str = "raise", fps: float | None = None,
                         progress: bool = True) -> dict:
    from tqdm import tqdm

    from .store import EpisodeWriter

    folder = os.path.expanduser(str(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"video folder '{folder}' does not exist")
    sources = list_sources(folder)
    skips = SkipLog(on_error)
    meta = dict(image_shape=[int(image_size[0]), int(image_size[1]), 3], action_dim=0, source="video_folder",
                folder=os.path.abspath(folder), fps=fps, clip_frames=clip_frames, frame_skip=frame_skip)
    readable = 0
    with EpisodeWriter(out, meta, resume=True, on_error=on_error) as w:
        w.skips = skips
        for kind, path in tqdm(sources, desc="video folder", unit="file", disable=not progress):
            if max_episodes is not None and len(w) >= max_episodes:
                break
            rel = os.path.relpath(path, folder)
            clip, k = [], 0
            try:
                for n, frame in enumerate(_frames(kind, path)):
                    if n % frame_skip:
                        continue
                    clip.append(fit(frame, image_size))
                    if len(clip) == clip_frames:
                        w.add(key=f"{rel}#{k}", images=np.stack(clip), actions=np.zeros((clip_frames, 0), np.float32),
                              instruction="", source=path)
                        clip, k = [], k + 1
                        if max_episodes is not None and len(w) >= max_episodes:
                            break
                if clip:
                    w.add(key=f"{rel}#{k}", images=np.stack(clip), actions=np.zeros((len(clip), 0), np.float32),
                          instruction="", source=path)
                    k += 1
                if k == 0:
                    raise DataError("no frames", file=path, field="frames")
                readable += 1
            except DataError as e:
                skips.handle(e)
            except Exception as e:  # imageio / PIL / ffmpeg errors for unreadable files
                skips.handle(DataError(f"cannot read ({type(e).__name__}: {e})", file=path, field="frames"))
        if readable == 0 and len(w) == 0:
            raise FileNotFoundError(f"video folder '{folder}' has no readable videos ({', '.join(VIDEO_EXT)}) "
                                    f"or images ({', '.join(IMAGE_EXT)})")
        summary = {"episodes": len(w), "files": readable, "skipped": len(skips), "skipped_items": list(skips.items)}
    return summary
