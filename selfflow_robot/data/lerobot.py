"""A local LeRobotDataset folder (format v2.0, v2.1 or v3.0) read into an episode store.

Only pyarrow (parquet) and imageio-ffmpeg (mp4, AV1 included) are needed: no lerobot, datasets or
Hub install, and no network; point `data_dir` at a dataset already on disk (e.g. one fetched with
`huggingface-cli download --repo-type dataset ...`).

  meta/info.json     codebase_version, fps, features (dtype, shape, names), data/video path templates
  tasks              v3: meta/tasks.parquet (task string -> task_index); v2: meta/tasks.jsonl
  episodes           v3: meta/episodes/chunk-*/file-*.parquet (one row per episode, with each
                     camera's video file and from/to timestamps); v2: meta/episodes.jsonl
  data/**.parquet    one row per frame: episode_index, frame_index, timestamp, action,
                     observation.state, task_index (+ images for dtype "image" features)
  videos/            v3: many episodes per mp4, an episode starts at its from_timestamp;
                     v2: one mp4 per episode and camera

The chosen camera becomes the store's frames (the frame shown at each row's timestamp); several
cameras (e.g. a scene and a wrist camera) are tiled side by side into one frame, so the model sees
every view in one image and policies send the extra views as obs["images"]. `action` gives the
actions, `observation.state` the state, and the episode's task the instruction.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re

import numpy as np

from .errors import DataError, SkipLog, check_data_dir

IMAGE_DTYPES = ("video", "image")


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _names(feature: dict, dim: int) -> list[str] | None:
    """LeRobot writes names as a list, or as {"motors": [...]} / {"axes": [...]}."""
    names = feature.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, list) and len(names) == dim and all(isinstance(n, str) for n in names):
        return names
    return None


def _hwc(shape) -> tuple | None:
    """A feature's (H, W, 3) from its shape, (h, w, c) in v2 and usually (c, h, w) in v3."""
    shape = list(shape or [])
    if len(shape) != 3:
        return None
    h, w = shape[:2] if shape[-1] in (1, 3, 4) else shape[1:]
    return int(h), int(w), 3


def _matrix(column, n: int, path: str, name: str) -> np.ndarray:
    """A list<float> (or scalar) parquet column as float32 [n, D]."""
    import pyarrow as pa

    arr = column.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        if n and flat.size % n:
            raise DataError("rows of different lengths", file=path, field=name)
        return flat.astype(np.float32).reshape(n, -1)
    return arr.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, 1)


def check_dataset_dir(root, dataset: str = "a LeRobotDataset") -> str:
    """The expanded dataset folder, or an error saying that it is unset, missing or lacks meta/info.json."""
    root = check_data_dir(root, dataset, "a LeRobotDataset folder, the one holding meta/info.json")
    if not os.path.isfile(os.path.join(root, "meta", "info.json")):
        raise FileNotFoundError(f"'{root}' is not a LeRobotDataset folder: no meta/info.json")
    return root


def _decode_failure(e: Exception) -> str:
    """ffmpeg's complaint without its banner (version, build configuration, library versions):
    imageio puts ffmpeg's whole stderr into the exception."""
    head, _, err = str(e).partition("=== stderr ===")
    lines = [re.sub(r"^\[[^]]*\]\s*", "", ln.strip()) for ln in err.splitlines()
             if ln.strip() and not ln.startswith(("ffmpeg version", "  built with", "  configuration:", "  lib"))]
    reason = "; ".join(dict.fromkeys(lines[:2])) or (head.strip().splitlines() or [type(e).__name__])[0]
    return f"cannot decode the video ({reason}): truncated, or not an mp4?"


class _VideoCursor:
    """Frames of one mp4 in order; episodes of a v3 file are read front to back, so each file is
    decoded once. Asking for an earlier frame reopens the file."""

    def __init__(self):
        self.path, self.reader, self.index, self.frame = None, None, -1, None

    def get(self, path: str, index: int) -> np.ndarray:
        if path != self.path or index < self.index:
            self.close()
            import imageio.v2 as imageio

            self.path, self.reader, self.index = path, imageio.get_reader(path, format="FFMPEG"), -1
        while self.index < index:
            try:
                self.frame = self.reader.get_next_data()
            except (IndexError, StopIteration):
                raise DataError(f"video ends at frame {self.index}, frame {index} requested", file=path,
                                field="frames") from None
            self.index += 1
        return self.frame

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.path, self.reader, self.index, self.frame = None, None, -1, None


class LeRobotReader:
    """Episodes of a LeRobotDataset folder as dicts (key, images, actions, state, instruction)."""

    def __init__(self, root: str, camera: str | list | None = None, action_key: str = "action",
                 state_key: str | None = "auto", image_size=None, on_error: str = "raise"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ImportError("reading a LeRobotDataset needs pyarrow: pip install 'selfflow-robot[lerobot]'") from None
        self.root = check_dataset_dir(root)
        info_path = os.path.join(self.root, "meta", "info.json")
        with open(info_path, encoding="utf-8") as f:
            self.info = json.load(f)
        self.version = str(self.info.get("codebase_version", "v2.1"))
        if not self.version.startswith(("v2", "v3")):
            raise DataError(f"codebase_version {self.version} is not supported (v2.0, v2.1, v3.0)", file=info_path,
                            field="codebase_version")
        feats = self.info.get("features") or {}
        self.fps = float(self.info.get("fps") or 0) or None
        cams = [k for k, v in feats.items() if v.get("dtype") in IMAGE_DTYPES]
        if camera is None:
            if not cams:
                raise DataError("no image or video feature to train on", file=info_path, field="features")
            camera = cams[0]
        self.cameras = [camera] if isinstance(camera, str) else [str(c) for c in camera]
        bad = [c for c in self.cameras if c not in cams]
        if bad:
            raise DataError(f"camera '{bad[0]}' is not an image/video feature; the dataset has {cams}",
                            file=info_path, field="features")
        if not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise DataError(f"cameras must be distinct, got {self.cameras}", file=info_path, field="camera")
        if action_key not in feats:
            raise DataError(f"no action feature '{action_key}' (features: {sorted(feats)})", file=info_path,
                            field="features")
        if state_key == "auto":
            state_key = "observation.state" if "observation.state" in feats else None
        elif state_key is not None and state_key not in feats:
            raise DataError(f"no state feature '{state_key}' (features: {sorted(feats)})", file=info_path,
                            field="features")
        self.camera, self.action_key, self.state_key = self.cameras[0], action_key, state_key
        self.is_video = {c: feats[c]["dtype"] == "video" for c in self.cameras}
        self.video_fps = {c: float((feats[c].get("info") or {}).get("video.fps") or self.fps or 0) for c in self.cameras}
        natives = {_hwc(feats[c].get("shape")) for c in self.cameras}
        self.native_shape = natives.pop() if len(natives) == 1 else None
        self.image_size = tuple(int(s) for s in image_size) if image_size else None
        if self.native_shape is None and self.image_size is None and len(self.cameras) > 1:
            raise DataError(f"cameras {self.cameras} differ in size; set image_size to tile them", file=info_path,
                            field="image_size")
        self.action_dim = int(np.prod(feats[action_key].get("shape") or [1]))
        self.state_dim = int(np.prod(feats[state_key].get("shape") or [1])) if state_key else 0
        self.action_names = _names(feats[action_key], self.action_dim)
        self.state_names = _names(feats[state_key], self.state_dim) if state_key else None
        self.skips = SkipLog(on_error)
        self.tasks = self._load_tasks()
        self.episode_meta = self._load_episodes()
        self._data_cache: tuple[str, dict] | None = None

    # ------------------------------------------------------------------ metadata
    @property
    def view_shape(self) -> tuple:
        """(H, W, 3) of one camera in the store."""
        if self.image_size:
            return (*self.image_size, 3)
        if self.native_shape is None:
            raise DataError("the camera feature has no shape; set image_size", field=self.camera)
        return self.native_shape

    @property
    def image_shape(self) -> tuple:
        """(H, W x cameras, 3): the views side by side."""
        h, w, c = self.view_shape
        return (h, w * len(self.cameras), c)

    def _load_tasks(self) -> dict[int, str]:
        v3 = os.path.join(self.root, "meta", "tasks.parquet")
        if os.path.isfile(v3):
            import pyarrow.parquet as pq

            cols = pq.read_table(v3).to_pydict()  # pandas wrote the task strings as its index column
            text = next((c for c in ("task", "__index_level_0__") if c in cols),
                        next((c for c, v in cols.items() if v and isinstance(v[0], str)), None))
            if text is None or "task_index" not in cols:
                raise DataError("expected columns task_index and the task text", file=v3, field="tasks")
            return {int(i): str(t) for i, t in zip(cols["task_index"], cols[text])}
        v2 = os.path.join(self.root, "meta", "tasks.jsonl")
        if os.path.isfile(v2):
            return {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(v2)}
        return {}

    def _load_episodes(self) -> list[dict]:
        files = sorted(glob.glob(os.path.join(self.root, "meta", "episodes", "**", "*.parquet"), recursive=True))
        if files:
            import pyarrow.parquet as pq

            def wanted(col: str) -> bool:  # not the per-episode stats/* columns (arrays per feature)
                return col in ("episode_index", "tasks", "length") or col.startswith(
                    ("data/", *(f"videos/{c}/" for c in self.cameras)))

            rows = [r for f in files
                    for r in pq.read_table(f, columns=[c for c in pq.read_schema(f).names if wanted(c)]).to_pylist()]
        elif os.path.isfile(os.path.join(self.root, "meta", "episodes.jsonl")):
            rows = _read_jsonl(os.path.join(self.root, "meta", "episodes.jsonl"))
        else:
            raise FileNotFoundError(f"'{self.root}': no episode metadata (meta/episodes/ or meta/episodes.jsonl)")
        return sorted(rows, key=lambda r: int(r["episode_index"]))

    def _data_file(self, ep: dict) -> str:
        tpl = self.info.get("data_path") or ""
        chunk = int(ep.get("data/chunk_index", int(ep["episode_index"]) // int(self.info.get("chunks_size", 1000))))
        return os.path.join(self.root, tpl.format(chunk_index=chunk, file_index=int(ep.get("data/file_index", 0)),
                                                  episode_chunk=chunk, episode_index=int(ep["episode_index"]),
                                                  total_episodes=int(self.info.get("total_episodes", 0))))

    def _video(self, ep: dict, cam: str) -> tuple[str, float]:
        """(mp4 path, time of the episode's first frame in it) for a camera."""
        tpl, i = self.info.get("video_path") or "", int(ep["episode_index"])
        if f"videos/{cam}/chunk_index" in ep:  # v3: episodes share files
            path = tpl.format(video_key=cam, chunk_index=int(ep[f"videos/{cam}/chunk_index"]),
                              file_index=int(ep[f"videos/{cam}/file_index"]))
            return os.path.join(self.root, path), float(ep.get(f"videos/{cam}/from_timestamp") or 0.0)
        chunk = i // int(self.info.get("chunks_size", 1000))
        return os.path.join(self.root, tpl.format(video_key=cam, episode_chunk=chunk, episode_index=i)), 0.0

    # ------------------------------------------------------------------ episodes
    def _rows(self, path: str, episode: int) -> dict:
        """The episode's rows of a data file, in frame order (a v3 file holds many episodes; it is
        read once and indexed by episode)."""
        if self._data_cache is None or self._data_cache[0] != path:
            if not os.path.isfile(path):
                raise DataError("data file missing", file=path, episode=episode)
            self._data_cache = (path, self._load_data(path, episode))
        columns, rows_of = self._data_cache[1]
        take = rows_of.get(episode)
        if take is None:
            raise DataError("no rows for this episode", file=path, episode=episode)
        return {k: v[take] if isinstance(v, np.ndarray) else v.take(take).to_pylist() for k, v in columns.items()}

    def _load_data(self, path: str, episode: int) -> tuple[dict, dict]:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        need = ["episode_index", "frame_index", "timestamp", self.action_key,
                *([self.state_key] if self.state_key else []), *(c for c in self.cameras if not self.is_video[c])]
        missing = [c for c in need if c not in table.column_names]
        if missing:
            raise DataError(f"columns {missing} missing", file=path, episode=episode, field=missing[0])
        n = table.num_rows
        columns = {k: table[k].to_numpy() for k in ("episode_index", "frame_index", "timestamp")}
        for k in (self.action_key, self.state_key):
            if k:
                columns[k] = _matrix(table[k], n, path, k)
        if "task_index" in table.column_names:
            columns["task_index"] = table["task_index"].to_numpy()
        for c in self.cameras:
            if not self.is_video[c]:
                columns[c] = table[c].combine_chunks()  # taken per episode, decoded lazily
        order = np.lexsort((columns["frame_index"], columns["episode_index"]))
        eps = columns["episode_index"][order]
        starts = np.flatnonzero(np.r_[True, eps[1:] != eps[:-1]])
        ends = np.r_[starts[1:], len(eps)]
        return columns, {int(eps[a]): order[a:b] for a, b in zip(starts, ends)}

    def _frame(self, image) -> np.ndarray:
        """Resized to image_size without cropping, as a policy resizes the robot's live camera image,
        so training and deployment see the same picture (as the RT-1 reader does). A camera of
        another aspect ratio is stretched: said once per frame size."""
        image = np.ascontiguousarray(np.asarray(image)[..., :3])
        if not self.image_size or image.shape[:2] == self.image_size:
            return image
        self._check_aspect(image.shape[:2])
        from PIL import Image

        h, w = self.image_size
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def _check_aspect(self, hw: tuple) -> None:
        warned = self.__dict__.setdefault("_aspect_warned", set())
        (h, w), (th, tw) = hw, self.image_size
        if hw in warned or abs((h / w) / (th / tw) - 1) <= 0.1:
            return
        warned.add(hw)
        logging.getLogger("selfflow_robot").warning(
            "%s: camera frames of %dx%d (aspect %.2f) are stretched to dataset.image_size=[%d, %d] (aspect %.2f); "
            "set dataset.image_size to the camera's aspect (e.g. [%d, %d]) or null for the native size",
            self.root, h, w, h / w, th, tw, th / tw, th, int(round(th * w / h)))

    def _decode(self, ep: dict, rows: dict, cursors: dict) -> np.ndarray:
        """Every camera's frames for the episode's rows, tiled side by side."""
        return np.concatenate([self._decode_camera(ep, rows, c, cursors[c]) for c in self.cameras], axis=2)

    def _decode_camera(self, ep: dict, rows: dict, cam: str, cursor: _VideoCursor) -> np.ndarray:
        episode = int(ep["episode_index"])
        if not self.is_video[cam]:  # images in the parquet rows: {"bytes": png/jpeg, "path": file}
            from PIL import Image

            out = []
            for cell in rows[cam]:
                data = cell.get("bytes") if isinstance(cell, dict) else cell
                path = cell.get("path") if isinstance(cell, dict) else None
                if not data and path:  # only a file name: images/<key>/episode-.../frame-....png
                    path = path if os.path.isabs(path) else os.path.join(self.root, path)
                    if not os.path.isfile(path):
                        raise DataError("image file missing", file=path, episode=episode, field=cam)
                    with open(path, "rb") as f:
                        data = f.read()
                if not data:
                    raise DataError("image cell has neither bytes nor a path", episode=episode, field=cam)
                with Image.open(io.BytesIO(data)) as im:
                    out.append(self._frame(np.asarray(im.convert("RGB"))))
            return np.stack(out)
        path, start = self._video(ep, cam)
        if not os.path.isfile(path):
            raise DataError("video file missing", file=path, episode=episode, field=cam)
        if not self.video_fps[cam]:
            raise DataError("no fps in meta/info.json to find frames by timestamp", field="fps")
        # The frame on screen at each row's timestamp (LeRobot's own lookup, to the nearest frame).
        index = [int(round((start + float(t)) * self.video_fps[cam])) for t in rows["timestamp"]]
        try:
            return np.stack([self._frame(cursor.get(path, i)) for i in index])
        except DataError:
            raise
        except Exception as e:  # the mp4, not the data parquet, is what could not be read
            cursor.close()
            raise DataError(_decode_failure(e), file=path, episode=episode, field=cam) from None

    def episodes(self, skip_keys=frozenset(), max_episodes: int | None = None):
        cursors, done = {c: _VideoCursor() for c in self.cameras}, 0
        try:
            for ep in self.episode_meta:
                if max_episodes is not None and done >= max_episodes:
                    break
                episode = int(ep["episode_index"])
                key = f"episode_{episode:06d}"
                if key in skip_keys:
                    done += 1
                    continue
                try:
                    out = self._episode(ep, key, cursors)
                except DataError as e:
                    self.skips.handle(e)
                    continue
                except Exception as e:  # ffmpeg / PIL / pyarrow errors on a corrupt file
                    self.skips.handle(DataError(f"cannot read ({type(e).__name__}: {e})",
                                                file=self._data_cache[0] if self._data_cache else None,
                                                episode=episode))
                    continue
                done += 1
                yield out
        finally:
            for cursor in cursors.values():
                cursor.close()

    def _episode(self, ep: dict, key: str, cursors: dict) -> dict:
        episode = int(ep["episode_index"])
        path = self._data_file(ep)
        rows = self._rows(path, episode)
        actions = rows[self.action_key]
        if actions.shape[1] != self.action_dim or not np.isfinite(actions).all():
            raise DataError(f"actions of shape {actions.shape} (expected [T, {self.action_dim}], finite)", file=path,
                            episode=episode, field=self.action_key)
        state = rows[self.state_key] if self.state_key else None
        tasks = list(ep.get("tasks") or [])
        if not tasks and "task_index" in rows:
            tasks = [self.tasks.get(int(rows["task_index"][0]), "")]
        return dict(key=key, images=self._decode(ep, rows, cursors), actions=actions, state=state,
                    instruction=str(tasks[0]) if tasks else "", file=path)


def convert_lerobot(reader: LeRobotReader, out: str, meta: dict, max_episodes: int | None = None,
                    progress: bool = True) -> dict:
    """Convert (resumably: episode keys) into the episode store at `out`; returns a summary."""
    from tqdm import tqdm

    from .store import EpisodeWriter

    meta = dict(meta, image_shape=list(reader.image_shape), action_dim=reader.action_dim, state_dim=reader.state_dim,
                embedding_dim=0, fps=reader.fps, camera=reader.camera, views=reader.cameras, codebase_version=reader.version,
                action_names=meta.get("action_names") or reader.action_names, state_names=reader.state_names)
    total = len(reader.episode_meta) if max_episodes is None else min(max_episodes, len(reader.episode_meta))
    with EpisodeWriter(out, meta, resume=True, on_error=reader.skips.on_error) as w:
        w.skips = reader.skips
        existing = len(w)
        for ep in tqdm(reader.episodes(skip_keys=w.keys, max_episodes=max_episodes), desc="convert lerobot",
                       unit="ep", initial=existing, total=total, disable=not progress):
            w.add(key=ep["key"], images=ep["images"], actions=ep["actions"], instruction=ep["instruction"],
                  state=ep["state"], source=ep["file"])
        w.flush()
        return {"episodes": len(w), "added": len(w) - existing, "skipped": len(reader.skips),
                "skipped_items": list(reader.skips.items)}
