"""A tiny LeRobotDataset written by LeRobot itself (its stats.json has q01/q99), shaped like
gym-pusht (observation.image, observation.state[2], action[2]), for lerobot-train runs offline.
Usage: python make_dataset.py ROOT [episodes] [steps]"""
from __future__ import annotations

import sys

import numpy as np


def make_dataset(root: str, episodes: int = 3, steps: int = 12):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        "observation.image": {"dtype": "image", "shape": (48, 48, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
    }
    ds = LeRobotDataset.create("local/selfflow_tiny", fps=10, features=features, root=root, use_videos=False)
    rng = np.random.default_rng(0)
    for e in range(episodes):
        pos = rng.uniform(100, 400, 2).astype(np.float32)
        for k in range(steps):
            target = (pos + rng.normal(0, 20, 2)).astype(np.float32)
            img = np.full((48, 48, 3), 40 + 15 * k + 5 * e, np.uint8)
            ds.add_frame({"observation.image": img, "observation.state": pos.copy(), "action": target,
                          "task": "push the T" if e % 2 else "push the block"})
            pos = target
        ds.save_episode()
    ds.finalize()
    return ds


if __name__ == "__main__":
    make_dataset(sys.argv[1], *(int(a) for a in sys.argv[2:]))
