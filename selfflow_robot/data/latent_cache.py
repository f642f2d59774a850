"""Cached latents: every frame of an episode store encoded once by the frozen autoencoder.

With `model.autoencoder=DIR` the training step encodes each clip's frames again, every time the
clip is drawn; for the SD-VAE at RT-1's 256x320 that encoder costs a large share of the step.
`clip.cached_latents=true` encodes the store once (on the training device, resuming whatever a
killed run left) and then trains on the latents, which are also 24x smaller to read than the
frames (32x40x4 float16 against 256x320x3 uint8).

Layout, beside the frames it was made from::

    STORE/latents/<key>/latents.json      {"format", "version", "identity", "latent_shape", ...}
                        shard_000000.npy   float16 [steps, h, w, C], row for row the shard's frames

`<key>` hashes the identity: the autoencoder's weights (every tensor, so a retrained or different
autoencoder never reads stale latents) and the frame size they were encoded at. A shard's file is
written under a temporary name and renamed when whole, so the files present are the work done.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket

import numpy as np
import torch

from ..fileio import write_json_atomic
from .clips import resize_frames
from .errors import DataError
from .store import EpisodeStore

FORMAT, VERSION = "selfflow-latent-cache", 1
_TMP_TAG = f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"
log = logging.getLogger(__name__)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every tensor of the module's state dict (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_identity(autoencoder: torch.nn.Module, image_size) -> dict:
    return {"weights_sha256": weights_digest(autoencoder), "image_size": [int(x) for x in image_size]}


def cache_path(store: EpisodeStore, identity: dict, root: str | None = None) -> str:
    """STORE/latents/<key>; under another root (a read-only store), ROOT/<store name>-<path hash>/<key>."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    if root is None:
        return os.path.join(store.path, "latents", key)
    where = os.path.abspath(store.path)
    name = f"{os.path.basename(where.rstrip(os.sep))}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"
    return os.path.join(os.path.abspath(root), name, key)


def _shard_file(path: str, name: str) -> str:
    return os.path.join(path, f"{name}.npy")


def _shard_done(path: str, name: str, steps: int, latent_shape) -> bool:
    f = _shard_file(path, name)
    if not os.path.isfile(f):
        return False
    try:
        a = np.load(f, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{f}: unreadable cached latents ({e}); delete the file and it is encoded again") from None
    if a.shape != (steps, *latent_shape) or a.dtype != np.float16:
        raise DataError(f"{f}: cached latents of shape {a.shape} {a.dtype}, expected {(steps, *latent_shape)} "
                        "float16; delete the file and it is encoded again")
    return True


class LatentCache:
    """Read access to a complete cache: `rows(j, idx)` are latents of shard j's frames `idx`."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "latents.json"), encoding="utf-8") as f:
            self.info = json.load(f)
        self.latent_shape = tuple(self.info["latent_shape"])
        self._names = list(self.info["shards"])
        self._arrays: dict[int, np.ndarray] = {}
        self._pid = None

    def __getstate__(self):  # DataLoader workers open their own memory maps
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def rows(self, j: int, idx) -> np.ndarray:
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        a = self._arrays.get(j)
        if a is None:
            a = self._arrays[j] = np.load(_shard_file(self.path, self._names[j]), mmap_mode="r", allow_pickle=False)
        return np.asarray(a[np.asarray(idx, dtype=np.int64)])


def _encode_shard(store: EpisodeStore, j: int, autoencoder, image_size, device, batch: int, out: str, bar,
                  autocast) -> None:
    name, steps = store.shard_names[j], store.shard_steps(j)
    images = store.shard_images(j)
    native = tuple(images.shape[1:3])
    tmp = _shard_file(out, f".{name}.{_TMP_TAG}.tmp")  # two runs encoding at once never share one
    try:
        _fill_shard(store, name, steps, images, native, autoencoder, image_size, device, batch, tmp, bar, autocast)
    except BaseException:  # an error or Ctrl-C mid-shard: the finished shards stay, the partial one goes
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, _shard_file(out, name))


def _fill_shard(store, name, steps, images, native, autoencoder, image_size, device, batch, tmp, bar, autocast):
    from ..models.tokens import frames_to_float

    z_all = None
    for a in range(0, steps, batch):
        frames = np.array(images[a:a + batch])  # a copy: torch wants writable memory
        if native != tuple(image_size):
            frames = resize_frames(frames, image_size)
        x = frames_to_float(torch.from_numpy(frames).to(device)).permute(0, 3, 1, 2)
        with torch.no_grad(), autocast():
            z = autoencoder.encode(x).permute(0, 2, 3, 1).float().cpu().numpy()
        if z_all is None:
            z_all = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(steps, *z.shape[1:]))
        z16 = z.astype(np.float16)
        if not np.isfinite(z16).all():
            raise DataError(f"store {store.path}, {name}: the autoencoder gave a non-finite latent for frames "
                            f"{a}..{a + len(frames) - 1} (or one beyond float16's range); nothing was cached for it")
        z_all[a:a + len(frames)] = z16
        if bar is not None:
            bar.update(len(frames))
    z_all.flush()
    del z_all


def _remove_dead_temporaries(out: str) -> None:
    """Partial shards of runs killed outright (SIGKILL, power loss) on this host; a live run's stay."""
    host = _TMP_TAG.rsplit("-", 1)[0]
    for f in os.listdir(out):
        parts = f.split(".")  # .shard_000003.<host>-<pid>.tmp.npy
        if not (f.startswith(".") and f.endswith(".tmp.npy") and len(parts) == 5 and parts[2].rsplit("-", 1)[0] == host):
            continue
        try:
            os.kill(int(parts[2].rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            os.remove(os.path.join(out, f))
        except (ValueError, PermissionError):
            pass


def human_bytes(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else (
        f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:.1f} KiB")


def encode_store(store: EpisodeStore, autoencoder: torch.nn.Module, image_size, device="cpu", batch: int = 32,
                 rank: int = 0, world_size: int = 1, progress: bool = True, precision: str = "fp32",
                 root: str | None = None, source: str | None = None) -> LatentCache | None:
    """Encode the store's shards that are not cached yet (rank r of w takes every w-th one) and
    return the cache. Ranks other than 0 only encode; call `open_cache` after a barrier.
    precision="bf16" encodes under bf16 autocast, as the training step encodes frames on a GPU
    (the cache key does not change: the two differ by bf16 rounding only). A complete cache is
    opened without writing anything, so a finished cache of a read-only store is usable."""
    import contextlib

    device = torch.device(device)
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"latent cache precision must be bf16|fp32, got {precision!r}")
    if int(batch) < 1:
        raise ValueError(f"clip.cached_latents_batch={batch}: must be at least 1 frame per encoder call")
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16"
                else contextlib.nullcontext)
    autoencoder = autoencoder.to(device).eval()
    identity = cache_identity(autoencoder, image_size)
    out = cache_path(store, identity, root)
    h, w = (int(x) for x in image_size)
    with torch.no_grad():
        probe = autoencoder.encode(torch.zeros(1, 3, h, w, device=device))
    latent_shape = [int(probe.shape[2]), int(probe.shape[3]), int(probe.shape[1])]
    shards = {n: store.shard_steps(j) for j, n in enumerate(store.shard_names)}
    done = [j for j, n in enumerate(store.shard_names)
            if _shard_done(out, n, shards[n], latent_shape)] if os.path.isdir(out) else []
    todo = [j for j in range(len(shards)) if j % world_size == rank and j not in done]
    info_file = os.path.join(out, "latents.json")
    try:
        if rank == 0 and (todo or not os.path.isfile(info_file) or LatentCache(out).info["shards"] != shards):
            os.makedirs(out, exist_ok=True)
            write_json_atomic(info_file, {
                "format": FORMAT, "version": VERSION, "identity": identity, "latent_shape": latent_shape,
                "dtype": "float16", "encoded_with": precision, "autoencoder": source,
                "store": os.path.abspath(store.path), "shards": shards}, indent=1)
        if todo:
            os.makedirs(out, exist_ok=True)
            _remove_dead_temporaries(out)
            _encode_shards(store, todo, done, autoencoder, (h, w), latent_shape, device, batch, out, progress, autocast)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
            raise
        raise DataError(f"cannot write the latent cache {out}: {e.strerror}; set clip.cached_latents_dir to a "
                        "writable folder (a store's finished cache is read without writing)") from None
    return LatentCache(out) if world_size == 1 else None  # whole when one process encoded every shard


def _encode_shards(store, todo, done, autoencoder, image_size, latent_shape, device, batch, out, progress, autocast):
    frames = sum(store.shard_steps(j) for j in todo)
    kept = sum(store.shard_steps(j) for j in done)
    log.info("latents: encoding %d frames (%d shard(s)) at %dx%d into %s, %s as float16%s; finished shards "
             "are kept if this stops", frames, len(todo), *image_size, out,
             human_bytes(frames * np.prod(latent_shape) * 2), f"; {kept} frames already cached" if kept else "")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=frames, desc="encode latents", unit="frame", dynamic_ncols=True)
    try:
        for j in todo:
            _encode_shard(store, j, autoencoder, image_size, device, batch, out, bar, autocast)
    finally:
        if bar is not None:
            bar.close()


def open_cache(store: EpisodeStore, autoencoder: torch.nn.Module, image_size, root: str | None = None) -> LatentCache | None:
    """The complete cache of this store for these autoencoder weights and frame size, or None
    (with the reason logged) when some shard is not encoded yet."""
    out = cache_path(store, cache_identity(autoencoder, image_size), root)
    if not os.path.isfile(os.path.join(out, "latents.json")):
        return None
    cache = LatentCache(out)
    missing = [n for j, n in enumerate(store.shard_names)
               if not _shard_done(out, n, store.shard_steps(j), cache.latent_shape)]
    if missing or list(cache.info["shards"]) != store.shard_names:
        log.info("latents: %s covers %d of %d shards", out, len(store.shard_names) - len(missing), len(store.shard_names))
        return None
    return cache


def cache_bytes(cache: LatentCache) -> int:
    return sum(os.path.getsize(_shard_file(cache.path, n)) for n in cache.info["shards"])
