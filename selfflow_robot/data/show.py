"""`python -m selfflow_robot.data show dataset=... episode=0 out=episode.mp4`: look at the data.

For each episode: a video of its frames (at the dataset's fps) and, beside it, a plot of every
action dimension (and state dimension) against the step, titled with the instruction. The first
thing to check after converting a dataset: are the frames the right camera, the right way up, and
do the actions move when the robot does?
"""
from __future__ import annotations

import os

import numpy as np

from .store import EpisodeStore
from ..video import MIN_HEIGHT, upscale, write_video


def plot_episode(path: str, actions: np.ndarray, state: np.ndarray | None, title: str,
                 action_names=None, action_mask=None, state_names=None) -> str:
    """One panel per action dimension against the step, then one panel with every state dimension
    overlaid (Meta-World's state has 39). Dimensions that normalisation passes through (the
    store's action_mask, e.g. the gripper) say so in their title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"action {action_names[d] if action_names else d}"
               + ("" if action_mask is None or action_mask[d] else " (not normalised)"), actions[:, d])
              for d in range(actions.shape[1])]
    if state is not None and state.shape[1]:
        panels.append((f"state ({state.shape[1]} dims)", state))
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows + 0.4), squeeze=False, sharex=True,
                             layout="constrained")
    for ax, (name, values) in zip(axes.flat, panels):
        lines = ax.plot(values, lw=1.2)
        if name.startswith("state") and state_names and len(state_names) == values.shape[1] <= 12:
            ax.legend(lines, state_names, fontsize=6, ncols=2)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7, labelbottom=True)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.supxlabel("step", fontsize=9)
    fig.suptitle(title, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def show_episode(store: EpisodeStore, episode: int, out: str, fps: float | None = None,
                 min_height: int = MIN_HEIGHT) -> dict:
    """Writes the episode's video to `out` and its action plot to `<stem>_actions.png`; returns
    what was written (one JSON-able record)."""
    if not 0 <= episode < len(store):
        raise IndexError(f"episode={episode}: the store {store.path} has episodes 0..{len(store) - 1}")
    ep = store.episode(episode)
    meta = store.meta
    fps = float(fps or meta.get("fps") or 10)
    video = write_video(out, upscale(ep["images"], min_height), fps)
    title = f"episode {episode} ({ep['key']}): {ep['instruction'] or '(no instruction)'}"
    plot = None
    if ep["actions"].shape[1] or ep["state"] is not None:  # video-folder stores have neither
        plot = os.path.abspath(plot_episode(os.path.splitext(out)[0] + "_actions.png", ep["actions"], ep["state"],
                                            title, meta.get("action_names"), meta.get("action_mask"),
                                            meta.get("state_names")))
    rec = {"episode": episode, "key": ep["key"], "instruction": ep["instruction"], "steps": len(ep["actions"]),
           "image_shape": list(ep["images"].shape[1:]), "fps": fps, "video": os.path.abspath(video), "plot": plot}
    if len(meta.get("views") or []) > 1:
        rec["views"] = list(meta["views"])  # left to right in each frame
    return rec
