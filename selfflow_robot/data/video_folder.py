"""A folder of videos or images as an action-free episode store (pretraining data).

Videos (mp4, avi, mov, mkv, webm, gif; read with imageio/ffmpeg) are cut into clips of
`clip_frames` frames (every `frame_skip`-th frame); each folder of images is one sequence in
file-name order, cut the same way. Frames are centre-cropped to the target aspect ratio and
resized, so nothing is stretched. Episodes have 0-d actions. A video that cannot be read, or
that decodes to far fewer frames than its header declares (a file cut short), is bad data (on_error).
"""
from __future__ import annotations

import os
import re

import numpy as np

from .errors import DataError, SkipLog, check_data_dir

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


def check_video_folder(folder, dataset: str = "a video folder") -> str:
    """The expanded folder, or an error saying that it is unset, missing or not a folder."""
    return check_data_dir(folder, dataset, "a folder of .mp4 videos or images")


# A video that decodes to fewer frames than this share of what its header promises was cut
# short (a faststart mp4 cut off after its moov atom decodes without error up to the cut).
# The slack allows for rounded durations and an audio track that outlasts the video.
_MIN_DECODED = 0.9
_FFMPEG_BANNER = re.compile(r"(ffmpeg version|built with|configuration:|lib[a-z]+\s+\d+\.)")


def _declared_frames(meta: dict) -> int | None:
    """Frames in an ffmpeg-read video by its header (duration x fps); None when it gives no duration."""
    fps, duration = meta.get("fps") or 0, meta.get("duration") or 0
    n = fps * duration
    return round(n) if 0 < n < float("inf") else None


def _decoder_reason(err: Exception) -> str:
    """An imageio/ffmpeg error in one line: its summary and ffmpeg's last log line, without the
    version banner and build configuration that ffmpeg prints first."""
    summary, _, log = str(err).partition("=== stderr ===")
    reason = " ".join(summary.split()).rstrip(":")
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not _FFMPEG_BANNER.match(ln.strip())]
    if lines:
        reason += ": " + re.sub(r"^\[[^]]*\]\s*", "", lines[-1])  # without its "[in#0 @ 0x...]" tag
    return f"{type(err).__name__}: {reason}"


def _frames(kind: str, path: str):
    if kind == "video":
        import imageio.v2 as imageio

        with imageio.get_reader(path) as reader:
            n = 0
            for n, frame in enumerate(reader, 1):
                yield frame
            declared = _declared_frames(reader.get_meta_data())
            if declared and n < _MIN_DECODED * declared:
                raise DataError(f"truncated: decoded {n} of {declared} frames", file=path, field="frames")
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

    folder = check_video_folder(folder)
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
            except Exception as e:  # DataError, or imageio / PIL / ffmpeg errors for unreadable files
                problem = e.problem if isinstance(e, DataError) else f"cannot read ({_decoder_reason(e)})"
                # the store cannot take back clips already written: say they stay
                kept = f"; its first {k} clip(s), decoded before this, are kept" if k else ""
                skips.handle(DataError(problem + kept, file=path, field="frames"))
        if readable == 0 and len(w) == 0:
            raise FileNotFoundError(f"video folder '{folder}' has no readable videos ({', '.join(VIDEO_EXT)}) "
                                    f"or images ({', '.join(IMAGE_EXT)})")
        summary = {"episodes": len(w), "files": readable, "skipped": len(skips), "skipped_items": list(skips.items)}
    return summary
