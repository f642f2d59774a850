"""`python -m selfflow_robot.data {stats|show|bench} [key=value ...]`

stats  JSON with the episode and step counts and per-dim action (and state) statistics of any
       dataset config: dataset=metaworld | rt1 data_dir=PATH | bridge data_dir=PATH |
       video_folder data_dir=FOLDER | store data_dir=STORE. build=false: only an existing store.
show   a video of an episode's frames and a plot of its actions (and state) against the step:
       episode=0 (or a list [0,5]) out=episode.mp4 -> episode.mp4 + episode_actions.png.
bench  reading / conversion frames/s and clip-sampler clips/s (selfflow_robot.data.bench).
"""
from __future__ import annotations

import json

from selfflow_robot import cli

VERBS = ("stats", "show", "bench")


def _open(cfg):
    """The dataset's store; with build=false only one that already exists."""
    from .sources import is_complete, open_store, store_path
    from .store import EpisodeStore

    ds = cfg.dataset
    if cfg.get("build", True):
        return open_store(ds)
    path = store_path(ds)
    if ds.source != "store" and not is_complete(path):
        raise ValueError(f"no finished store for dataset {ds.name} at {path} (run with build=true)")
    return EpisodeStore(path)


def stats(cfg) -> dict:
    store = _open(cfg)
    ds = cfg.dataset
    lengths = store.lengths
    st = store.stats()
    meta = store.meta
    out = {"dataset": ds.get("name"), "store": store.path, "episodes": len(store), "steps": int(lengths.sum()),
           "episode_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())}
           if len(lengths) else None,
           "image_shape": meta["image_shape"], "fps": meta.get("fps"), "action_dim": meta["action_dim"],
           "action_names": meta.get("action_names"), "action_mask": meta.get("action_mask"),
           "action": st["action"], "state": st.get("state")}
    print(json.dumps(out))
    return out


def show(cfg) -> list[dict]:
    from omegaconf import OmegaConf

    from selfflow_robot.video import check_video_path, per_episode_path

    from .show import show_episode

    check_video_path(cfg.out)
    store = _open(cfg)
    episodes = [int(e) for e in cfg.episode] if OmegaConf.is_list(cfg.episode) else [int(cfg.episode)]
    bad = [e for e in episodes if not 0 <= e < len(store)]
    if bad:
        raise ValueError(f"episode={bad[0]}: the store {store.path} has episodes 0..{len(store) - 1}")
    shown = []
    for e in episodes:
        rec = show_episode(store, e, per_episode_path(str(cfg.out), e, len(episodes) > 1), cfg.get("fps"),
                           int(cfg.get("min_height", 256)))
        print(json.dumps(rec))
        shown.append(rec)
    return shown


def main(cfg):
    if cfg.get("verb") == "bench":
        from .bench import main as bench_main

        return bench_main(cfg)
    return show(cfg) if cfg.get("verb") == "show" else stats(cfg)  # cli.run turns bad input into one line


if __name__ == "__main__":
    cli.run("data", main, verbs=VERBS)
