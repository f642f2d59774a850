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

import hashlib
import json
import logging
import os

import numpy as np
import torch

from ..fileio import write_json_atomic
from .clips import resize_frames
from .errors import DataError
from .store import EpisodeStore

FORMAT, VERSION = "selfflow-latent-cache", 1
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


def cache_path(store: EpisodeStore, identity: dict) -> str:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(store.path, "latents", key)


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
    from ..models.tokens import frames_to_float

    name, steps = store.shard_names[j], store.shard_steps(j)
    images = store.shard_images(j)
    native = tuple(images.shape[1:3])
    tmp = _shard_file(out, f".{name}.{os.getpid()}.tmp")  # two runs encoding at once never share one
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
    os.replace(tmp, _shard_file(out, name))


def encode_store(store: EpisodeStore, autoencoder: torch.nn.Module, image_size, device="cpu", batch: int = 32,
                 rank: int = 0, world_size: int = 1, progress: bool = True, precision: str = "fp32") -> LatentCache:
    """Encode the store's shards that are not cached yet (rank r of w takes every w-th one) and
    return the cache. Ranks other than 0 only encode; call `open_cache` after a barrier.
    precision="bf16" encodes under bf16 autocast, as the training step encodes frames on a GPU
    (the cache key does not change: the two differ by bf16 rounding only)."""
    import contextlib

    device = torch.device(device)
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"latent cache precision must be bf16|fp32, got {precision!r}")
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16"
                else contextlib.nullcontext)
    autoencoder = autoencoder.to(device).eval()
    identity = cache_identity(autoencoder, image_size)
    out = cache_path(store, identity)
    os.makedirs(out, exist_ok=True)
    h, w = (int(x) for x in image_size)
    with torch.no_grad():
        probe = autoencoder.encode(torch.zeros(1, 3, h, w, device=device))
    latent_shape = [int(probe.shape[2]), int(probe.shape[3]), int(probe.shape[1])]
    if rank == 0:
        write_json_atomic(os.path.join(out, "latents.json"), {
            "format": FORMAT, "version": VERSION, "identity": identity, "latent_shape": latent_shape,
            "dtype": "float16", "encoded_with": precision, "store": os.path.abspath(store.path),
            "shards": {n: store.shard_steps(j) for j, n in enumerate(store.shard_names)}}, indent=1)
    todo = [j for j, n in enumerate(store.shard_names)
            if j % world_size == rank and not _shard_done(out, n, store.shard_steps(j), latent_shape)]
    if todo:
        frames = sum(store.shard_steps(j) for j in todo)
        log.info("latents: encoding %d frames of %d shard(s) at %dx%d into %s", frames, len(todo), h, w, out)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=frames, desc="encode latents", unit="frame", dynamic_ncols=True)
        try:
            for j in todo:
                _encode_shard(store, j, autoencoder, (h, w), device, batch, out, bar, autocast)
        finally:
            if bar is not None:
                bar.close()
    return LatentCache(out) if world_size == 1 else None


def open_cache(store: EpisodeStore, autoencoder: torch.nn.Module, image_size) -> LatentCache | None:
    """The complete cache of this store for these autoencoder weights and frame size, or None
    (with the reason logged) when some shard is not encoded yet."""
    out = cache_path(store, cache_identity(autoencoder, image_size))
    if not os.path.isfile(os.path.join(out, "latents.json")):
        return None
    cache = LatentCache(out)
    missing = [n for j, n in enumerate(store.shard_names)
               if not _shard_done(out, n, store.shard_steps(j), cache.latent_shape)]
    if missing or list(cache.info["shards"]) != store.shard_names:
        log.info("latents: %s covers %d of %d shards", out, len(store.shard_names) - len(missing), len(store.shard_names))
        return None
    return cache
