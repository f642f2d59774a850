"""`python -m selfflow_robot.data {stats|bench} [key=value ...]`

stats  JSON with the episode and step counts and per-dim action (and state) statistics of any
       dataset config: dataset=metaworld | rt1 data_dir=PATH | bridge data_dir=PATH |
       video_folder data_dir=FOLDER | store data_dir=STORE. build=false: only an existing store.
bench  reading / conversion frames/s and clip-sampler clips/s (selfflow_robot.data.bench).
"""
from __future__ import annotations

import json

from selfflow_robot import cli

VERBS = ("stats", "bench")


def stats(cfg) -> dict:
    from .sources import is_complete, open_store, store_path
    from .store import EpisodeStore

    ds = cfg.dataset
    if cfg.get("build", True):
        store = open_store(ds)
    else:
        path = store_path(ds)
        if ds.source != "store" and not is_complete(path):
            raise SystemExit(f"no finished store for dataset {ds.name} at {path} (run with build=true)")
        store = EpisodeStore(path)
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


def main(cfg):
    if cfg.get("verb") == "bench":
        from .bench import main as bench_main

        return bench_main(cfg)
    from .errors import DataError

    try:
        return stats(cfg)
    except (FileNotFoundError, DataError) as e:  # a message naming the path is all the user needs
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli.run("data", main, verbs=VERBS)
