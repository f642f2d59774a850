"""`open_store(cfg.dataset)`: from a dataset config to a ready episode store.

source: store         an existing store at `path`
source: metaworld     scripted-expert demonstrations, collected on first use
source: rlds          RT-1 / Bridge / any RLDS builder dir at `data_dir`, converted on first use
source: video_folder  videos / images at `path` (action-free), converted on first use
source: lerobot       a local LeRobotDataset folder (v2.x or v3.0) at `path`, converted on first use

Converted stores live in `store_dir`, or by default under $SELFFLOW_DATA_CACHE
(~/.cache/selfflow_robot/stores) in a folder named after the dataset and a hash of every
setting that changes its contents. A conversion that is interrupted resumes on the next call
(episode keys); `conversion.json` marks a finished one, so later calls only open the store.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

from .store import EpisodeStore, _try_lock, _write_json_atomic

# Settings that change the contents of a converted store, per source.
_CONTENT_KEYS = {
    "metaworld": ("tasks", "episodes_per_task", "image_size", "camera", "action_repeat", "max_steps", "seed",
                  "keep_failures", "state_mode"),
    "rlds": ("data_dir", "image_size", "max_episodes", "rlds"),
    "video_folder": ("path", "image_size", "clip_frames", "frame_skip", "max_episodes"),
    "lerobot": ("path", "image_size", "max_episodes", "camera", "action_key", "state_key"),
}


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return dict(cfg)


def cache_root() -> str:
    return os.environ.get("SELFFLOW_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "selfflow_robot", "stores")


def store_path(cfg) -> str:
    """Where the store for this dataset config lives (explicit store_dir or the cache)."""
    cfg = _plain(cfg)
    source = cfg.get("source")
    if source == "store":
        if not cfg.get("path"):
            raise ValueError("dataset=store needs the store directory: data_dir=PATH (or dataset.path=PATH)")
        return os.path.expanduser(str(cfg["path"]))
    if cfg.get("store_dir"):
        return os.path.expanduser(str(cfg["store_dir"]))
    if source not in _CONTENT_KEYS:
        raise ValueError(f"unknown dataset source {source!r}; expected store, metaworld, rlds, video_folder or lerobot")
    content = {k: cfg.get(k) for k in _CONTENT_KEYS[source]}
    if content.get("state_mode", "proprio") in (None, "proprio"):
        content.pop("state_mode", None)  # the default: stores collected before the option keep their path
    for k in ("data_dir", "path"):
        if content.get(k):
            content[k] = os.path.abspath(os.path.expanduser(str(content[k])))
    digest = hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return os.path.join(cache_root(), f"{cfg.get('name') or source}-{digest}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "conversion.json")) and os.path.isfile(os.path.join(path, "index.json"))


def build_store(cfg, progress: bool | None = None) -> dict:
    """Convert or collect (resuming) the data of a dataset config into its store; returns a summary."""
    cfg = _plain(cfg)
    source, out = cfg.get("source"), store_path(cfg)
    progress = cfg.get("progress", True) if progress is None else progress
    if source == "metaworld":
        from selfflow_robot.collect import collect_metaworld

        summary = collect_metaworld(out, tasks=cfg.get("tasks", "mt10"), episodes_per_task=int(cfg["episodes_per_task"]),
                                    image_size=cfg["image_size"], camera=cfg.get("camera", "corner"),
                                    action_repeat=int(cfg.get("action_repeat", 4)), max_steps=int(cfg.get("max_steps", 60)),
                                    workers=int(cfg.get("workers", 0)), seed=int(cfg.get("seed", 0)),
                                    keep_failures=bool(cfg.get("keep_failures", False)), progress=progress,
                                    state_mode=cfg.get("state_mode") or "proprio")
    elif source == "rlds":
        from .rlds import RLDSMapping, RLDSReader
        from .rlds_convert import convert_rlds

        if not cfg.get("data_dir"):
            raise ValueError(f"dataset {cfg.get('name')} needs data_dir=PATH (the TFDS builder directory, "
                             "e.g. .../fractal20220817_data/0.1.0)")
        reader = RLDSReader(cfg["data_dir"], RLDSMapping.from_config(cfg.get("rlds") or {}),
                            image_size=cfg.get("image_size"), on_error=cfg.get("on_error", "raise"))
        meta = {"source": cfg.get("name") or "rlds", "fps": cfg.get("fps"), "data_dir": os.path.abspath(cfg["data_dir"]),
                "action_names": (cfg.get("rlds") or {}).get("action_names"),
                "action_mask": (cfg.get("normalization") or {}).get("mask")}
        summary = convert_rlds(reader, out, meta, max_episodes=cfg.get("max_episodes"), progress=progress,
                               workers=int(cfg.get("workers") or 0))
    elif source == "video_folder":
        from .video_folder import convert_video_folder

        summary = convert_video_folder(cfg["path"], out, image_size=cfg["image_size"],
                                       clip_frames=int(cfg.get("clip_frames", 32)), frame_skip=int(cfg.get("frame_skip", 1)),
                                       max_episodes=cfg.get("max_episodes"), on_error=cfg.get("on_error", "raise"),
                                       fps=cfg.get("fps"), progress=progress)
    elif source == "lerobot":
        from .lerobot import LeRobotReader, convert_lerobot

        if not cfg.get("path"):
            raise ValueError("dataset=lerobot needs the dataset folder (the one holding meta/info.json): data_dir=PATH")
        reader = LeRobotReader(cfg["path"], camera=cfg.get("camera"), action_key=cfg.get("action_key") or "action",
                               state_key=cfg.get("state_key", "auto"), image_size=cfg.get("image_size"),
                               on_error=cfg.get("on_error", "raise"))
        meta = {"source": cfg.get("name") or "lerobot", "data_dir": os.path.abspath(os.path.expanduser(cfg["path"])),
                "action_names": cfg.get("action_names"), "action_mask": (cfg.get("normalization") or {}).get("mask")}
        summary = convert_lerobot(reader, out, meta, max_episodes=cfg.get("max_episodes"), progress=progress)
    else:
        raise ValueError(f"dataset source {source!r} cannot be built; expected metaworld, rlds, video_folder or lerobot")
    if summary.get("skipped"):
        print(f"[selfflow_robot.data] {out}: skipped {summary['skipped']} episodes with bad data "
              "(listed in conversion.json)", file=sys.stderr)
    _write_json_atomic(os.path.join(out, "conversion.json"), {"complete": True, "config": cfg, "summary": summary})
    return summary


def open_store(cfg, progress: bool | None = None) -> EpisodeStore:
    """The EpisodeStore of a dataset config, building it first if it is missing or unfinished."""
    plain = _plain(cfg)
    path = store_path(plain)
    if plain.get("source") != "store" and not is_complete(path):
        # Several processes (DDP ranks, parallel jobs) may ask at once: one builds, the
        # others wait on the lock and then find the finished store.
        os.makedirs(path, exist_ok=True)
        lock = _try_lock(os.path.join(path, ".build.lock"), blocking=True)
        try:
            if not is_complete(path):
                build_store(plain, progress)
        finally:
            lock.close()
    return EpisodeStore(path)


def make_normalizer(store: EpisodeStore, cfg, episodes=None):
    """ActionNormalizer from the dataset config's `normalization` {mode, mask} (mask null: the
    store's meta.action_mask), with statistics over the episodes used."""
    from .normalize import ActionNormalizer

    norm = _plain(cfg).get("normalization") or {}
    return ActionNormalizer.from_store(store, mode=norm.get("mode", "q99"), mask=norm.get("mask"), episodes=episodes)
