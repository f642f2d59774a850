"""Clip sampler: a map-style Dataset over every (episode, start step) of an episode store.

Item keys (docs/design.md, "Clip sampler"): context uint8[N,h,w,3], future uint8[M,h,w,3],
future_mask bool[M], actions float32[H,A] (normalised), action_mask bool[H], instruction str,
instruction_embedding float32[E] (stores with embeddings), state float32[S] at the start step
(stores with state; normalised when the normaliser has state statistics), plus episode/start.
With a latent cache (data/latent_cache.py) also context_latents float16[N,h,w,C] and
future_latents float16[M,h,w,C] of the same frames; frames=False then leaves the frames out.
"""
from __future__ import annotations

import numpy as np
import torch.utils.data

from .normalize import ActionNormalizer
from .store import EpisodeStore


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = size
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in frames])


class ClipDataset(torch.utils.data.Dataset):
    def __init__(self, store: EpisodeStore | str, context_frames: int = 1, future_frames: int = 4,
                 frame_stride: int = 1, action_chunk: int = 6, image_size=None,
                 normalizer: ActionNormalizer | None = None, episodes=None, latents=None, frames: bool = True):
        self.store = store if isinstance(store, EpisodeStore) else EpisodeStore(store)
        bad = [f"clip.{k}={v} (must be >= {low})" for k, v, low in (
            ("context_frames", context_frames, 1), ("future_frames", future_frames, 0),
            ("frame_stride", frame_stride, 1), ("action_chunk", action_chunk, 0)) if v < low]
        if bad:
            raise ValueError(", ".join(bad))
        self.n, self.m, self.s, self.h = int(context_frames), int(future_frames), int(frame_stride), int(action_chunk)
        native = tuple(self.store.meta["image_shape"][:2])
        self.image_size = native if image_size is None else (int(image_size[0]), int(image_size[1]))
        self._resize = self.image_size != native
        self.normalizer = normalizer
        self.latents, self.with_frames = latents, bool(frames)
        if latents is None and not frames:
            raise ValueError("ClipDataset(frames=False) needs latents to read instead")
        self.episodes = np.arange(len(self.store)) if episodes is None else np.asarray(episodes, dtype=np.int64)
        lengths = self.store.lengths[self.episodes]
        # Every start step of every episode is a sample; flat index -> (episode, start) by bisection.
        # Without actions (pretraining), a start whose every future frame lies past the episode's
        # end supervises nothing: the last `frame_stride` steps are not samples then.
        starts = lengths if self.h > 0 or self.m == 0 else np.maximum(lengths - self.s, 0)
        self._cum = np.concatenate([[0], np.cumsum(starts)])
        self.action_dim = int(self.store.meta["action_dim"])

    def __len__(self) -> int:
        return int(self._cum[-1])

    def locate(self, idx: int) -> tuple[int, int]:
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        k = int(np.searchsorted(self._cum, idx, side="right") - 1)
        return int(self.episodes[k]), int(idx - self._cum[k])

    def __getitem__(self, idx: int) -> dict:
        ep, start = self.locate(int(idx))
        store = self.store
        length = store.episode_length(ep)
        ctx = np.maximum(start - self.s * np.arange(self.n - 1, -1, -1), 0)
        fut = start + self.s * np.arange(1, self.m + 1)
        future_mask = fut < length
        fut = np.minimum(fut, length - 1)
        steps = np.concatenate([ctx, fut])
        act_idx = start + np.arange(self.h)
        action_mask = act_idx < length
        if self.action_dim:
            actions = store.gather(ep, "actions", np.minimum(act_idx, length - 1)).astype(np.float32)
            if self.normalizer is not None:
                actions = self.normalizer.normalize(actions)
        else:
            actions = np.zeros((self.h, 0), np.float32)
        item = {"future_mask": future_mask, "actions": actions, "action_mask": action_mask,
                "instruction": store.instruction(ep), "episode": ep, "start": start}
        if self.with_frames:
            frames = store.frames(ep, steps)  # one gather from the memory map
            if self._resize:
                frames = resize_frames(frames, self.image_size)
            item["context"], item["future"] = frames[:self.n], frames[self.n:]
        if self.latents is not None:
            shard, first, _ = store.rows(ep)
            z = self.latents.rows(shard, first + steps)
            item["context_latents"], item["future_latents"] = z[:self.n], z[self.n:]
        emb = store.instruction_embedding(ep)
        if emb is not None:
            item["instruction_embedding"] = emb
        if int(store.meta.get("state_dim", 0)):
            st = store.gather(ep, "state", [start])[0].astype(np.float32)
            item["state"] = self.normalizer.normalize_state(st) if self.normalizer is not None else st
        return item
