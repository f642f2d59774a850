"""Tiny synthetic data for the data tests (3 episodes x ~10 steps, 32x32 images)."""
from __future__ import annotations

import numpy as np

from selfflow_robot.data import EpisodeWriter


def make_episode(t: int, seed: int, image_shape=(32, 32, 3), action_dim=4, state_dim=2):
    rng = np.random.default_rng(seed)
    images = np.zeros((t, *image_shape), np.uint8)
    images[:, 0, 0, 0] = np.arange(t)  # frame number in a pixel: checks which frame came back
    images[:, 0, 0, 1] = seed
    actions = rng.normal(size=(t, action_dim)).astype(np.float32)
    actions[:, 0] = np.arange(t) + 100 * seed  # step number in dim 0: checks alignment
    state = rng.normal(size=(t, state_dim)).astype(np.float32) if state_dim else None
    return dict(images=images, actions=actions, state=state)


def write_store(path, lengths=(10, 7, 12), embedding_dim=0, shard_bytes=256 << 20, **kw):
    meta = dict(image_shape=[32, 32, 3], action_dim=4, state_dim=2, embedding_dim=embedding_dim, fps=10,
                source="synthetic", action_names=["x", "y", "z", "gripper"], action_mask=[True, True, True, False])
    with EpisodeWriter(path, meta, shard_bytes=shard_bytes, **kw) as w:
        for i, t in enumerate(lengths):
            ep = make_episode(t, i)
            emb = np.full(embedding_dim, i, np.float32) if embedding_dim else None
            w.add(key=f"ep{i}", instruction=f"task {i}", instruction_embedding=emb, **ep)
    return path
