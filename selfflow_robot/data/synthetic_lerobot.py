"""Synthetic LeRobotDataset folders in the v2.1 and v3.0 layouts, written with pyarrow and ffmpeg
as LeRobot writes them (per-episode files in v2.1; shared files and from/to timestamps in v3.0),
for the tests and `python -m selfflow_robot.data bench`, and for trying the LeRobot path without a
download: `python -m selfflow_robot.data.synthetic_lerobot OUT [--version v3.0|v2.1] [--episodes N]
[--steps T] [--wrist] [--texture]` (then `finetune dataset=lerobot data_dir=OUT`).

Frame k of episode e has mean brightness 40 + 8k + 3e (codec-proof: decoded frames are matched
by their mean; `texture=True` adds a moving zero-mean pattern so that video decoding costs what
camera footage costs), action[:, 0] = 100 e + k, state[:, 0] = -k. An optional wrist camera
(v3.0, `wrist=True`: "observation.images.wrist", WRIST_SIZE) shows the inverse brightness.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

FPS = 10
WRIST_SIZE = (48, 64)
LENGTHS = (7, 5, 9)
TASKS = ("pick up the cube", "open the drawer")


def brightness(episode: int, k: int) -> int:
    return 40 + 8 * k + 3 * episode


def frames(episode: int, n: int, size=(64, 80), texture: bool = False) -> np.ndarray:
    out = np.stack([np.full((*size, 3), brightness(episode, k), np.float32) for k in range(n)])
    if texture:
        yy, xx = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
        for k in range(n):
            out[k] += 30 * np.sin(xx / 7 + k / 3)[..., None] * np.cos(yy / 11 - k / 5)[..., None]
    return out.clip(0, 255).astype(np.uint8)


def _camera(size, video: bool, codec: str) -> dict:
    cam = {"dtype": "video" if video else "image", "shape": [size[0], size[1], 3], "names": ["height", "width", "channel"]}
    if video:
        cam["info"] = {"video.fps": FPS, "video.codec": "av1" if "av1" in codec else "h264", "video.pix_fmt": "yuv420p"}
    return cam


def _features(size, video: bool, codec: str = "libx264", wrist: bool = False) -> dict:
    cams = {"observation.images.top": _camera(size, video, codec)}
    if wrist:  # v3 writes (c, h, w)
        cams["observation.images.wrist"] = dict(_camera(WRIST_SIZE, video, codec), shape=[3, *WRIST_SIZE],
                                                names=["channels", "height", "width"])
    return {**cams,
            "observation.state": {"dtype": "float32", "shape": [2], "names": ["a", "b"]},
            "action": {"dtype": "float32", "shape": [3], "names": {"motors": ["x", "y", "gripper"]}},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None}}


def _rows(episode: int, n: int, start_index: int, images=None) -> dict:
    rows = {"observation.state": [[-float(k), 0.5] for k in range(n)],
            "action": [[100.0 * episode + k, 0.0, 1.0] for k in range(n)],
            "timestamp": [k / FPS for k in range(n)], "frame_index": list(range(n)),
            "episode_index": [episode] * n, "index": list(range(start_index, start_index + n)),
            "task_index": [episode % len(TASKS)] * n}
    if images is not None:
        rows["observation.images.top"] = images
    return rows


def _write_parquet(path: str, rows: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(rows), path)


def _write_mp4(path: str, video: np.ndarray, codec: str = "libx264") -> None:
    import imageio.v2 as imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder library logs its banner past ffmpeg's log level
    with imageio.get_writer(path, fps=FPS, codec=codec, macro_block_size=1, ffmpeg_log_level="error") as w:
        for f in video:
            w.append_data(f)


def _info(version: str, size, video: bool, lengths, codec: str = "libx264", wrist: bool = False, **paths) -> dict:
    return {"codebase_version": version, "robot_type": "toy", "fps": FPS, "chunks_size": 1000,
            "total_episodes": len(lengths), "total_frames": int(sum(lengths)),
            "features": _features(size, video, codec, wrist), **paths}


def write_v21(root: str, video: bool = True, size=(64, 80), lengths=LENGTHS, image_files: bool = False) -> str:
    """v2.1: one parquet and one mp4 per episode; meta/episodes.jsonl and meta/tasks.jsonl."""
    import io

    from PIL import Image

    data_path = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    video_path = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    start = 0
    for e, n in enumerate(lengths):
        pix = frames(e, n, size)
        images = None
        if not video:
            images = []
            for k, f in enumerate(pix):
                if image_files:  # only the path in the parquet, as LeRobot's image writer leaves it
                    rel = f"images/observation.images.top/episode-{e:06d}/frame-{k:06d}.png"
                    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
                    Image.fromarray(f).save(os.path.join(root, rel))
                    images.append({"bytes": None, "path": rel})
                    continue
                buf = io.BytesIO()
                Image.fromarray(f).save(buf, format="PNG")
                images.append({"bytes": buf.getvalue(), "path": None})
        _write_parquet(os.path.join(root, data_path.format(episode_chunk=0, episode_index=e)), _rows(e, n, start, images))
        if video:
            _write_mp4(os.path.join(root, video_path.format(episode_chunk=0, video_key="observation.images.top",
                                                            episode_index=e)), pix)
        start += n
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(_info("v2.1", size, video, lengths, data_path=data_path, video_path=video_path if video else None), f)
    with open(os.path.join(root, "meta", "episodes.jsonl"), "w") as f:
        f.writelines(json.dumps({"episode_index": e, "tasks": [TASKS[e % 2]], "length": n}) + "\n"
                     for e, n in enumerate(lengths))
    with open(os.path.join(root, "meta", "tasks.jsonl"), "w") as f:
        f.writelines(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS))
    return root


def write_v30(root: str, size=(64, 80), codec: str = "libx264", lengths=LENGTHS, episodes_per_file: int = 2,
              texture: bool = False, wrist: bool = False) -> str:
    """v3.0: `episodes_per_file` consecutive episodes share a data file and a video file (each
    starts at the previous one's end: its from_timestamp); meta/episodes/ and meta/tasks.parquet
    (task strings as the index). The defaults: episodes 0-1 in file 0, episode 2 in file 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_path = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    video_path = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    ids = list(range(len(lengths)))
    files = {f: ids[i:i + episodes_per_file] for f, i in enumerate(range(0, len(ids), episodes_per_file))}
    cams = ["observation.images.top", *(["observation.images.wrist"] if wrist else [])]
    meta_rows, start = [], 0
    for file_index, eps in files.items():
        rows: dict = {}
        clock = 0.0
        for e in eps:
            n = lengths[e]
            for k, v in _rows(e, n, start).items():
                rows.setdefault(k, []).extend(v)
            row = {"episode_index": e, "tasks": [TASKS[e % 2]], "length": n,
                   "data/chunk_index": 0, "data/file_index": file_index,
                   "dataset_from_index": start, "dataset_to_index": start + n,
                   "stats/action/mean": [100.0 * e + (n - 1) / 2, 0.0, 1.0]}  # (not read)
            for cam in cams:
                row.update({f"videos/{cam}/chunk_index": 0, f"videos/{cam}/file_index": file_index,
                            f"videos/{cam}/from_timestamp": clock, f"videos/{cam}/to_timestamp": clock + n / FPS})
            meta_rows.append(row)
            clock += n / FPS
            start += n
        _write_parquet(os.path.join(root, data_path.format(chunk_index=0, file_index=file_index)), rows)
        top = np.concatenate([frames(e, lengths[e], size, texture) for e in eps])
        _write_mp4(os.path.join(root, video_path.format(video_key="observation.images.top", chunk_index=0,
                                                        file_index=file_index)), top, codec)
        if wrist:
            inverse = 255 - np.concatenate([frames(e, lengths[e], WRIST_SIZE) for e in eps])
            _write_mp4(os.path.join(root, video_path.format(video_key="observation.images.wrist", chunk_index=0,
                                                            file_index=file_index)), inverse, codec)
    _write_parquet(os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet"),
                   {k: [r[k] for r in meta_rows] for k in meta_rows[0]})
    # pandas' DataFrame.to_parquet keeps the index (the task strings) as a column named after it
    pq.write_table(pa.table({"task_index": list(range(len(TASKS))), "__index_level_0__": list(TASKS)}),
                   os.path.join(root, "meta", "tasks.parquet"))
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(_info("v3.0", size, True, lengths, codec, wrist, data_path=data_path, video_path=video_path), f)
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m selfflow_robot.data.synthetic_lerobot",
                                description="Write a synthetic LeRobotDataset folder (needs pyarrow and ffmpeg: "
                                            "pip install 'selfflow-robot[lerobot]'); OUT must not exist yet.")
    p.add_argument("out", metavar="OUT", help="dataset folder to create (then: dataset=lerobot data_dir=OUT)")
    p.add_argument("--version", choices=("v3.0", "v2.1"), default="v3.0", help="LeRobot layout (v3.0)")
    p.add_argument("--episodes", type=int, default=len(LENGTHS), help=f"number of episodes ({len(LENGTHS)})")
    p.add_argument("--steps", type=int, default=None, help=f"steps per episode (default: {', '.join(map(str, LENGTHS))}, "
                                                            "repeated)")
    p.add_argument("--wrist", action="store_true", help=f"add observation.images.wrist ({WRIST_SIZE[0]}x"
                                                        f"{WRIST_SIZE[1]}; v3.0 only)")
    p.add_argument("--texture", action="store_true", help="moving texture, so video decoding costs what footage "
                                                          "costs (v3.0 only)")
    args = p.parse_args(argv)
    if args.episodes < 1 or (args.steps is not None and args.steps < 2):
        p.error("--episodes must be at least 1 and --steps at least 2")
    if args.version == "v2.1" and (args.wrist or args.texture):
        p.error("--wrist and --texture are written in the v3.0 layout only")
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"error: {args.out} exists and is not empty; choose a new folder")
    lengths = tuple(args.steps or LENGTHS[e % len(LENGTHS)] for e in range(args.episodes))
    if args.version == "v2.1":
        write_v21(args.out, lengths=lengths)
    else:
        write_v30(args.out, lengths=lengths, texture=args.texture, wrist=args.wrist)
    print(f"wrote {args.episodes} episodes ({sum(lengths)} frames, LeRobotDataset {args.version}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
