"""The episode store: the one on-disk format every data source converts into.

Layout of a store directory::

    index.json                 {"format", "version", "meta", "shards": [{"name", "lengths": [...]}]}
    shard_000000/images.npy    uint8 [steps, H, W, 3]   (raw frames at the training resolution)
                 actions.npy   float32 [steps, A]
                 state.npy     float32 [steps, S]       (only when meta.state_dim > 0)
                 embeddings.npy float32 [episodes, E]   (only when meta.embedding_dim > 0)
                 episodes.json {"keys": [...], "instructions": [...]}
    stats.json                 per-dim action/state statistics (cached, keyed by the index size)

Raw uint8 frames in memory-mapped .npy files make a random frame read a memcpy: no decoding
in the training loop, O(1) memory in the dataset size, and any number of reader processes.
A shard is written under a temporary name and renamed, then index.json is replaced
atomically, so a killed conversion leaves a valid store; episode keys make resuming exact.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from ..fileio import write_json_atomic
from .errors import DataError, SkipLog
from .stats import array_stats

FORMAT, VERSION = "selfflow-episode-store", 1
_SHAPE_KEYS = ("image_shape", "action_dim", "state_dim", "embedding_dim")


def _write_json_atomic(path: str, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1)


def _try_lock(path: str, blocking: bool = False):
    """An exclusive flock on `path` (released when the returned file is closed), or None."""
    import fcntl

    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        f.close()
        return None
    return f


def _read_index(path: str) -> dict:
    index_path = os.path.join(path, "index.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"episode store '{path}' does not exist")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"'{path}' is not an episode store: it has no index.json "
                                "(convert or collect data into it first)")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"episode store '{path}': index.json is not valid JSON ({e})") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"episode store '{path}': index.json is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise ValueError(f"episode store '{path}': version {index.get('version')} is not supported "
                         f"(this code reads version {VERSION})")
    return index


class EpisodeStore:
    """Read-only random access to a store directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = _read_index(self.path)
        self.meta: dict = index["meta"]
        self._shards: list[dict] = index["shards"]
        self._lengths = [np.asarray(s["lengths"], dtype=np.int64) for s in self._shards]
        counts = np.array([len(x) for x in self._lengths], dtype=np.int64)
        self._first_episode = np.concatenate([[0], np.cumsum(counts)])
        # Step offset of each episode inside its shard.
        self._offsets = [np.concatenate([[0], np.cumsum(x)[:-1]]) if len(x) else x for x in self._lengths]
        self._cache_pid = None
        self._arrays: dict[int, dict] = {}
        self._episodes: dict[int, dict] = {}

    # Memory maps are opened lazily and per process: DataLoader workers (fork or spawn) each
    # get their own handles, and nothing big is ever copied between processes.
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _shard(self, j: int) -> dict:
        if self._cache_pid != os.getpid():
            self._arrays, self._episodes, self._cache_pid = {}, {}, os.getpid()
        arrays = self._arrays.get(j)
        if arrays is None:
            d = os.path.join(self.path, self._shards[j]["name"])
            steps = int(self._lengths[j].sum())
            required = {"images"} | {name for name, key in (("actions", "action_dim"), ("state", "state_dim"),
                                                            ("embeddings", "embedding_dim"))
                                     if int(self.meta.get(key) or 0)}
            arrays = {}
            for name in ("images", "actions", "state", "embeddings"):
                f = os.path.join(d, f"{name}.npy")
                if os.path.exists(f):
                    arrays[name] = _load_shard_array(f, steps if name != "embeddings" else 0)
                elif name in required:
                    raise DataError(f"{f} is missing: store {self.path} is damaged (its index lists "
                                    f"{len(self._lengths[j])} episodes in {self._shards[j]['name']})")
            try:
                with open(os.path.join(d, "episodes.json"), encoding="utf-8") as fh:
                    self._episodes[j] = json.load(fh)
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"{os.path.join(d, 'episodes.json')}: unreadable ({e}); store {self.path} is damaged") from None
            self._arrays[j] = arrays
        return arrays

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"episode {i} out of range for store '{self.path}' with {n} episodes")
        i = int(i) % n
        j = int(np.searchsorted(self._first_episode, i, side="right") - 1)
        return j, i - int(self._first_episode[j])

    def __len__(self) -> int:
        return int(self._first_episode[-1])

    @property
    def num_steps(self) -> int:
        return int(sum(int(x.sum()) for x in self._lengths))

    @property
    def lengths(self) -> np.ndarray:
        """Length of every episode, in store order."""
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self._shards]

    def shard_steps(self, j: int) -> int:
        return int(self._lengths[j].sum())

    def shard_images(self, j: int) -> np.ndarray:
        """Shard j's frames, memory-mapped: uint8 [steps, H, W, 3]."""
        return self._shard(j)["images"]

    def rows(self, i: int) -> tuple[int, int, int]:
        """(shard, first row in it, length) of episode i: how side arrays such as cached latents,
        laid out row for row like the shard's frames, find an episode."""
        j, k = self._locate(i)
        return j, int(self._offsets[j][k]), int(self._lengths[j][k])

    def episode_length(self, i: int) -> int:
        j, k = self._locate(i)
        return int(self._lengths[j][k])

    def _span(self, i: int) -> tuple[dict, int, int]:
        """(shard arrays, first row, length) of episode i."""
        j, k = self._locate(i)
        return self._shard(j), int(self._offsets[j][k]), int(self._lengths[j][k])

    def gather(self, i: int, field: str, idx) -> np.ndarray:
        """Rows `idx` (steps of episode i) of 'images', 'actions' or 'state', in one read."""
        arrays, start, length = self._span(i)
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= length):
            raise IndexError(f"step index out of range [0, {length}) for episode {i}")
        if field not in arrays:
            raise KeyError(f"episode store '{self.path}' has no '{field}'")
        return np.asarray(arrays[field][start + idx])

    def frames(self, i: int, idx) -> np.ndarray:
        return self.gather(i, "images", idx)

    def actions(self, i: int) -> np.ndarray:
        arrays, start, length = self._span(i)
        return np.array(arrays["actions"][start:start + length])

    def state(self, i: int) -> np.ndarray | None:
        arrays, start, length = self._span(i)
        return np.array(arrays["state"][start:start + length]) if "state" in arrays else None

    def instruction(self, i: int) -> str:
        j, k = self._locate(i)
        self._shard(j)
        return self._episodes[j]["instructions"][k]

    def key(self, i: int) -> str:
        j, k = self._locate(i)
        self._shard(j)
        return self._episodes[j]["keys"][k]

    def instruction_embedding(self, i: int) -> np.ndarray | None:
        j, k = self._locate(i)
        arrays = self._shard(j)
        return np.array(arrays["embeddings"][k]) if "embeddings" in arrays else None

    def episode(self, i: int) -> dict:
        arrays, start, length = self._span(i)
        return dict(images=np.array(arrays["images"][start:start + length]), actions=self.actions(i),
                    state=self.state(i), instruction=self.instruction(i),
                    instruction_embedding=self.instruction_embedding(i), key=self.key(i))

    def _field_stats(self, field: str, ids, arrays: list, dim: int) -> dict:
        """array_stats over the episodes' arrays. A NaN or inf would make the normalisation
        statistics NaN and training would quietly zero that dimension, so the first one is named
        instead (stores written by this package refuse them; one edited by other code may not)."""
        x = np.concatenate(arrays) if arrays else np.zeros((0, dim))
        if not np.isfinite(x).all():
            i, a = next((i, a) for i, a in zip(ids, arrays) if not np.isfinite(a).all())
            step, d = (int(v) for v in np.argwhere(~np.isfinite(a))[0])
            names = self.meta.get(f"{field}_names") or []
            name = f" ({names[d]})" if d < len(names) else ""
            raise DataError(f"{self.path}: episode {i} ({self.key(i)}) has a non-finite {field} ({a[step, d]}) "
                            f"at step {step}, dimension {d}{name}; fix or remove the episode")
        return array_stats(x)

    def stats(self, episodes=None) -> dict:
        """Per-dim action (and state) statistics. Over the whole store they are cached in
        stats.json; pass `episodes` (indices) for the statistics of the subset actually used."""
        cache = os.path.join(self.path, "stats.json")
        fingerprint = {"num_episodes": len(self), "num_steps": self.num_steps}
        if episodes is None and os.path.exists(cache):
            try:
                with open(cache, encoding="utf-8") as f:
                    cached = json.load(f)
                if all(cached.get(k) == v for k, v in fingerprint.items()) and _finite_json(cached):
                    return cached
            except (OSError, json.JSONDecodeError):
                pass  # recomputed below
        ids = range(len(self)) if episodes is None else [int(e) for e in episodes]
        acts = [self.actions(i) for i in ids]
        out = {"num_episodes": len(ids), "num_steps": int(sum(len(a) for a in acts)),
               "action": self._field_stats("action", ids, acts, int(self.meta["action_dim"]))}
        if int(self.meta.get("state_dim", 0)):
            out["state"] = self._field_stats("state", ids, [self.state(i) for i in ids], int(self.meta["state_dim"]))
        out["action_names"] = self.meta.get("action_names")
        out["action_mask"] = self.meta.get("action_mask")
        if episodes is None:
            try:
                _write_json_atomic(cache, out)
            except OSError:
                pass  # read-only store: statistics are still returned
        return out


def _load_shard_array(path: str, min_rows: int) -> np.ndarray:
    """Memory-map one shard array, or a DataError naming the file (never numpy's advice to load
    pickled data: store arrays are plain numbers, and a header that says otherwise is damage)."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = "not a plain numpy array" if "pickle" in str(e) else str(e)
        raise DataError(f"{path}: damaged or truncated ({reason}); re-collect or re-convert this store") from None
    if a.shape[0] < min_rows:
        raise DataError(f"{path}: {a.shape[0]} rows, but the store's index lists {min_rows} steps in this shard "
                        "(a truncated copy?)")
    return a


def _finite_json(obj) -> bool:
    if isinstance(obj, float):
        return np.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite_json(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_json(v) for v in obj)
    return True


class EpisodeWriter:
    """Appends episodes to a store; see the module docstring for the atomicity rules.

    meta must hold image_shape [H, W, 3] and action_dim; state_dim and embedding_dim default
    to 0 (absent). Everything else in meta (fps, source, action_names, action_mask, ...) is
    stored as is. With resume=True an existing store is extended and keys already in it are
    skipped (`add` returns False); with resume=False an existing store is an error.
    """

    def __init__(self, path: str | os.PathLike, meta: dict, resume: bool = True, on_error: str = "raise",
                 shard_bytes: int = 256 << 20):
        self.path = os.fspath(path)
        self.skips = SkipLog(on_error)
        self.shard_bytes = int(shard_bytes)
        meta = dict(meta)
        missing = [k for k in ("image_shape", "action_dim") if k not in meta]
        if missing:
            raise ValueError(f"EpisodeWriter meta lacks {missing}")
        meta["image_shape"] = [int(x) for x in meta["image_shape"]]
        if len(meta["image_shape"]) != 3 or meta["image_shape"][2] != 3:
            raise ValueError(f"meta image_shape must be [H, W, 3], got {meta['image_shape']}")
        for k in ("action_dim", "state_dim", "embedding_dim"):
            meta[k] = int(meta.get(k) or 0)
        os.makedirs(self.path, exist_ok=True)
        self._lock = _try_lock(os.path.join(self.path, ".writer.lock"))
        if self._lock is None:
            raise RuntimeError(f"another process is writing the episode store '{self.path}'")
        try:
            meta = self._open_existing(meta, resume)
        except BaseException:
            self._lock.close()
            raise
        self.meta = meta
        self._buffer: list[dict] = []
        self._buffer_bytes = 0
        self.added = 0
        self._write_index()

    def _open_existing(self, meta: dict, resume: bool) -> dict:
        """Clean up after a crash and, when resuming, load the keys already stored."""
        for name in os.listdir(self.path):  # leftovers of an interrupted shard write
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
        self._keys: set[str] = set()
        if os.path.exists(os.path.join(self.path, "index.json")):
            index = _read_index(self.path)
            if not resume and index["shards"]:
                raise FileExistsError(f"episode store '{self.path}' already has data; resume it "
                                      "(resume=true) or choose a new path")
            old = index["meta"]
            diff = [k for k in _SHAPE_KEYS if old.get(k) != meta.get(k)]
            if diff:
                raise ValueError(f"episode store '{self.path}' was written with different "
                                 + ", ".join(f"{k} ({old.get(k)} vs now {meta.get(k)})" for k in diff))
            meta = {**meta, **{k: old[k] for k in old if k not in meta}}
            self._shards = index["shards"]
            for s in self._shards:
                with open(os.path.join(self.path, s["name"], "episodes.json"), encoding="utf-8") as f:
                    self._keys.update(json.load(f)["keys"])
        else:
            self._shards = []
        return meta

    # -- public API ---------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def has(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> frozenset:
        """Keys of every episode stored or buffered so far."""
        return frozenset(self._keys)

    def add(self, key: str, images, actions, instruction: str = "", state=None,
            instruction_embedding=None, source: str | None = None) -> bool:
        """Validate and buffer one episode. Returns False when it was already stored or was
        skipped under on_error=skip; bad data raises DataError under on_error=raise."""
        key = str(key)
        if key in self._keys:
            return False
        try:
            ep = self._validate(key, images, actions, instruction, state, instruction_embedding, source)
        except DataError as e:
            self.skips.handle(e)
            return False
        self._keys.add(key)
        self._buffer.append(ep)
        self._buffer_bytes += ep["images"].nbytes + ep["actions"].nbytes
        self.added += 1
        if self._buffer_bytes >= self.shard_bytes:
            self.flush()
        return True

    def flush(self) -> None:
        if not self._buffer:
            return
        name = f"shard_{len(self._shards):06d}"
        tmp = os.path.join(self.path, f".tmp-{name}-{os.getpid()}")
        os.makedirs(tmp)
        eps = self._buffer
        np.save(os.path.join(tmp, "images.npy"), np.concatenate([e["images"] for e in eps]))
        np.save(os.path.join(tmp, "actions.npy"), np.concatenate([e["actions"] for e in eps]))
        if self.meta["state_dim"]:
            np.save(os.path.join(tmp, "state.npy"), np.concatenate([e["state"] for e in eps]))
        if self.meta["embedding_dim"]:
            np.save(os.path.join(tmp, "embeddings.npy"), np.stack([e["embedding"] for e in eps]))
        with open(os.path.join(tmp, "episodes.json"), "w", encoding="utf-8") as f:
            json.dump({"keys": [e["key"] for e in eps], "instructions": [e["instruction"] for e in eps]}, f)
        os.rename(tmp, os.path.join(self.path, name))
        self._shards.append({"name": name, "lengths": [len(e["actions"]) for e in eps]})
        self._write_index()
        self._buffer, self._buffer_bytes = [], 0

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None
        if len(self.skips):
            print(f"[selfflow_robot.data] {self.path}: {self.skips.report()}")

    # -- internals ------------------------------------------------------------------------
    def _write_index(self) -> None:
        _write_json_atomic(os.path.join(self.path, "index.json"),
                           {"format": FORMAT, "version": VERSION, "meta": self.meta, "shards": self._shards})

    def _validate(self, key, images, actions, instruction, state, embedding, source) -> dict:
        def err(field, problem):
            return DataError(problem, file=source, episode=key, field=field)

        actions = np.asarray(actions)
        if actions.ndim >= 1 and actions.shape[0] == 0:
            raise err("actions", "empty episode (0 steps)")
        if actions.ndim != 2 or actions.shape[1] != self.meta["action_dim"]:
            raise err("actions", f"expected shape [T, {self.meta['action_dim']}], got {list(actions.shape)}")
        t = actions.shape[0]
        if not np.issubdtype(actions.dtype, np.number) or not np.isfinite(actions).all():
            bad = np.argwhere(~np.isfinite(actions.astype(np.float64)))[0] if np.issubdtype(
                actions.dtype, np.number) else None
            raise err("actions", "non-finite value" + (f" at step {bad[0]}, dim {bad[1]}" if bad is not None else ""))
        images = np.asarray(images)
        want = (t, *self.meta["image_shape"])
        if images.dtype != np.uint8 or images.shape != want:
            raise err("images", f"expected uint8 {list(want)}, got {images.dtype} {list(images.shape)}")
        ep = {"key": key, "images": np.ascontiguousarray(images), "actions": actions.astype(np.float32)}
        if self.meta["state_dim"]:
            if state is None:
                raise err("state", f"missing (store has state_dim={self.meta['state_dim']})")
            state = np.asarray(state, dtype=np.float32)
            if state.shape != (t, self.meta["state_dim"]):
                raise err("state", f"expected shape [{t}, {self.meta['state_dim']}], got {list(state.shape)}")
            if not np.isfinite(state).all():
                raise err("state", "non-finite value")
            ep["state"] = state
        if self.meta["embedding_dim"]:
            if embedding is None:
                raise err("instruction_embedding", "missing")
            embedding = np.asarray(embedding, dtype=np.float32)
            if embedding.shape != (self.meta["embedding_dim"],) or not np.isfinite(embedding).all():
                raise err("instruction_embedding",
                          f"expected finite [{self.meta['embedding_dim']}], got {list(embedding.shape)}")
            ep["embedding"] = embedding
        if isinstance(instruction, bytes):
            instruction = instruction.decode("utf-8")
        if not isinstance(instruction, str):
            raise err("instruction", f"expected str, got {type(instruction).__name__}")
        ep["instruction"] = instruction
        return ep
