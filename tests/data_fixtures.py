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


def write_blob_store(path, episodes: int = 6, instruction=lambda ep: "move the blob" if ep % 2 else "push the blob",
                     source: str = "test") -> str:
    """Smooth moving-blob episodes (32x32, 12 steps, seeded) whose actions are the blob's velocity."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    meta = {"source": source, "fps": 10, "action_names": ["dx", "dy"], "image_shape": [32, 32, 3], "action_dim": 2}
    with EpisodeWriter(str(path), meta=meta) as w:
        for ep in range(episodes):
            pos, vel = rng.uniform(8, 24, 2), rng.uniform(-1, 1, 2)
            frames = []
            for _ in range(12):
                img = np.exp(-((yy - pos[0]) ** 2 + (xx - pos[1]) ** 2) / 20.0)
                frames.append(np.stack([img * 255, img * 128, 255 - img * 255], -1).astype(np.uint8))
                pos = np.clip(pos + vel, 4, 28)
            w.add(key=f"ep{ep}", images=np.stack(frames), actions=np.tile(vel.astype(np.float32), (12, 1)),
                  instruction=instruction(ep))
    return str(path)
