"""RLDS -> episode store conversion: in-process, or with spawn workers decoding shard files.

Workers (`workers=N`) each take every N-th shard file, decode its records and send the
standardised episodes through a bounded queue; this process validates and writes them (one
writer per store). Bad records travel as plain dicts and meet the same raise/skip policy here.
With `max_episodes` the conversion stays in-process, so "the first N episodes" is well defined.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback

from .errors import DataError
from .rlds import RLDSMapping, RLDSReader


def _error_fields(e: DataError) -> dict:
    return {"problem": e.problem, "file": e.file, "episode": e.episode, "field": e.field}


class _ForwardErrors:
    """A worker reader's SkipLog stand-in: bad data goes to the parent, which applies raise/skip."""

    def __init__(self, queue):
        self.queue = queue

    def handle(self, err: DataError, lost: int = 1) -> None:
        self.queue.put(("error", (_error_fields(err), lost)))


def _worker(queue, data_dir, mapping: dict, image_size, files, skip_keys) -> None:
    try:
        reader = RLDSReader(data_dir, RLDSMapping(**mapping), image_size=image_size)
        reader.skips = _ForwardErrors(queue)
        for ep in reader.episodes(files, skip_keys):
            queue.put(("episode", ep))
        queue.put(("done", None))
    except BaseException:  # anything unexpected: report it instead of leaving the parent waiting
        queue.put(("crash", traceback.format_exc()))


def _parallel_episodes(reader: RLDSReader, skip_keys: frozenset, workers: int):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork: a forked EGL/TF/torch state is not safe
    queue = ctx.Queue(maxsize=4 * workers)
    mapping = dataclasses.asdict(reader.mapping)
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(queue, reader.data_dir, mapping, reader.image_size, reader.files[k::workers],
                               skip_keys))
             for k in range(workers) if reader.files[k::workers]]
    for p in procs:
        p.start()
    try:
        running = len(procs)
        while running:
            kind, payload = queue.get()
            if kind == "episode":
                yield payload
            elif kind == "error":
                fields, lost = payload
                reader.skips.handle(DataError(**fields), lost)
            elif kind == "done":
                running -= 1
            else:
                raise RuntimeError(f"an RLDS conversion worker failed:\n{payload}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


def convert_rlds(reader: RLDSReader, out: str, meta: dict, max_episodes: int | None = None,
                 progress: bool = True, workers: int = 0) -> dict:
    """Convert (resumably) into the episode store at `out`; returns a summary."""
    from tqdm import tqdm

    from .store import EpisodeWriter

    meta = dict(meta, image_shape=list(reader.image_shape), views=list(reader.cameras), action_dim=reader.action_dim,
                state_dim=reader.state_dim, embedding_dim=reader.embedding_dim)
    with EpisodeWriter(out, meta, resume=True, on_error=reader.skips.on_error) as w:
        w.skips = reader.skips  # one report for reading and validation problems
        existing = len(w)
        if max_episodes is not None and existing >= max_episodes:
            episodes = iter(())
        elif workers > 0 and max_episodes is None:
            episodes = _parallel_episodes(reader, w.keys, workers)
        else:
            episodes = reader.episodes(skip_keys=w.keys)
        bar = tqdm(desc=f"convert {os.path.basename(os.path.normpath(reader.data_dir))}", unit="ep",
                   disable=not progress, total=max_episodes)
        t0, t_first, steps, first_steps = time.perf_counter(), None, 0, 0
        for ep in episodes:
            w.add(key=ep["key"], images=ep["images"], actions=ep["actions"], instruction=ep["instruction"],
                  state=ep["state"], instruction_embedding=ep["instruction_embedding"], source=ep.get("file"))
            steps += len(ep["actions"])
            if t_first is None:
                t_first, first_steps = time.perf_counter(), steps
            bar.update(1)
            if max_episodes is not None and len(w) >= max_episodes:
                break
        bar.close()
        w.flush()
        t1 = time.perf_counter()
        summary = {"episodes": len(w), "added": len(w) - existing, "steps_added": steps,
                   "seconds": round(t1 - t0, 3),
                   # time to the first episode (worker start-up), then the steady rate
                   "first_episode_s": None if t_first is None else round(t_first - t0, 3),
                   "steps_per_s_after_first": None if t_first is None or t1 <= t_first
                   else round((steps - first_steps) / (t1 - t_first), 1),
                   "skipped": len(reader.skips), "skipped_items": list(reader.skips.items)}
    return summary
