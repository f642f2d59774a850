"""`open_store(cfg.dataset)`: from a dataset config to a ready episode store.

source: store         an existing store at `path`
source: metaworld     scripted-expert demonstrations, collected on first use
source: rlds          RT-1 / Bridge / any RLDS builder dir at `data_dir`, converted on first use
source: video_folder  videos / images at `path` (action-free), converted on first use
source: lerobot       a local LeRobotDataset folder (v2.x or v3.0) at `path`, converted on first use

Converted stores live in `store_dir`, or by default under $SELFFLOW_DATA_CACHE
(~/.cache/selfflow_robot/stores) in a folder named after the dataset and a hash of every
setting that changes its contents (on_error=skip included) and of the source files' names,
sizes and mtimes (RLDS, LeRobot, video folders), so changed data gets a new store. A conversion that is interrupted
resumes on the next call (episode keys); `conversion.json` marks a finished one, so later calls
only open the store (and warn if it was built with skipped episodes).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

from .store import EpisodeStore, _try_lock, _write_json_atomic

# Settings that change the contents of a converted store, per source.
_CONTENT_KEYS = {
    "metaworld": ("tasks", "episodes_per_task", "image_size", "camera", "action_repeat", "max_steps", "seed",
                  "keep_failures", "state_mode"),
    "rlds": ("data_dir", "image_size", "max_episodes", "rlds", "on_error"),
    "video_folder": ("path", "image_size", "clip_frames", "frame_skip", "max_episodes", "on_error"),
    "lerobot": ("path", "image_size", "max_episodes", "camera", "action_key", "state_key", "on_error"),
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
    # Defaults are left out, so that stores made before the option keep their path
    if content.get("state_mode", "proprio") in (None, "proprio"):
        content.pop("state_mode", None)
    if content.get("on_error", "raise") in (None, "raise"):
        content.pop("on_error", None)  # a skip store must not be reused by raise, nor the reverse
    for k in ("data_dir", "path"):
        if content.get(k):
            content[k] = os.path.abspath(os.path.expanduser(str(content[k])))
    if source in ("rlds", "lerobot", "video_folder"):
        content["files"] = source_fingerprint(cfg)
    digest = hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return os.path.join(cache_root(), f"{cfg.get('name') or source}-{digest}")


def _files_fingerprint(root, recursive: bool, keep=lambda rel: True) -> str | None:
    """A cheap identity of the files under root: relative name, size and mtime (nothing is read);
    None if root is not a folder."""
    root = os.path.expanduser(os.fspath(root)) if root else None
    if not root or not os.path.isdir(root):
        return None
    entries = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(folder, name), root)
            if not name.startswith(".") and keep(rel):
                st = os.stat(os.path.join(folder, name))
                entries.append([rel, st.st_size, st.st_mtime_ns])
    return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:12]


def source_fingerprint(cfg) -> str | None:
    """The identity of the files a store is converted from (RLDS: the builder directory's
    dataset_info.json, features.json and shards; LeRobot and video folders: every file below
    them, as `lerobot record --resume` adds episodes in place); None for simulated sources."""
    source = cfg.get("source")
    if source == "rlds":
        return _files_fingerprint(cfg.get("data_dir"), recursive=False,
                                  keep=lambda n: n in ("dataset_info.json", "features.json") or ".tfrecord-" in n)
    if source in ("lerobot", "video_folder"):
        return _files_fingerprint(cfg.get("path"), recursive=True)
    return None


def check_source(cfg) -> None:
    """Errors a build would meet at once (data_dir unset, missing or wrong), before a store folder is made."""
    source = cfg.get("source")
    dataset = f"dataset {cfg.get('name') or source}"
    if source == "rlds":
        from .rlds import check_builder_dir

        check_builder_dir(cfg.get("data_dir"), dataset)
    elif source == "video_folder":
        from .video_folder import check_video_folder

        check_video_folder(cfg.get("path"), dataset)
    elif source == "lerobot":
        from .lerobot import check_dataset_dir

        check_dataset_dir(cfg.get("path"), dataset)


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
    _write_json_atomic(os.path.join(out, "conversion.json"), {"complete": True, "config": cfg, "summary": summary,
                                                              "source_fingerprint": source_fingerprint(cfg)})
    return summary


def _check_built(path: str, cfg: dict) -> None:
    """Warn (once per process and store, through `warnings`) about an existing store built with
    skipped episodes, or one at an explicit store_dir whose source files changed since."""
    try:
        with open(os.path.join(path, "conversion.json"), encoding="utf-8") as f:
            conv = json.load(f)
    except (OSError, ValueError):
        return
    skipped = (conv.get("summary") or {}).get("skipped") or 0
    if skipped:
        warnings.warn(f"the store {path} was built with on_error=skip: {skipped} episodes were skipped "
                      f"(listed under summary.skipped_items in {os.path.join(path, 'conversion.json')})",
                      stacklevel=3)
    built, now = conv.get("source_fingerprint"), source_fingerprint(cfg)
    if cfg.get("store_dir") and built and now and built != now:
        warnings.warn(f"the store {path} was converted from other files than those now at data_dir="
                      f"{cfg.get('data_dir')} (names, sizes or times differ); delete it to convert again",
                      stacklevel=3)


def open_store(cfg, progress: bool | None = None) -> EpisodeStore:
    """The EpisodeStore of a dataset config, building it first if it is missing or unfinished."""
    plain = _plain(cfg)
    path, built = store_path(plain), False
    if plain.get("source") != "store" and not is_complete(path):
        check_source(plain)  # a wrong data_dir leaves no empty store folder behind
        # Several processes (DDP ranks, parallel jobs) may ask at once: one builds, the
        # others wait on the lock and then find the finished store.
        os.makedirs(path, exist_ok=True)
        lock = _try_lock(os.path.join(path, ".build.lock"), blocking=True)
        try:
            if not is_complete(path):
                build_store(plain, progress)
                built = True  # build_store reported its skips itself
        finally:
            lock.close()
    if not built:
        _check_built(path, plain)
    return EpisodeStore(path)


def make_normalizer(store: EpisodeStore, cfg, episodes=None):
    """ActionNormalizer from the dataset config's `normalization` {mode, mask} (mask null: the
    store's meta.action_mask), with statistics over the episodes used."""
    from .normalize import ActionNormalizer

    norm = _plain(cfg).get("normalization") or {}
    return ActionNormalizer.from_store(store, mode=norm.get("mode", "q99"), mask=norm.get("mask"), episodes=episodes)
