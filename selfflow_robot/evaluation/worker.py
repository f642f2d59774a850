"""Episode execution, in-process or in spawned worker processes (one env per task, one policy).

Workers are started with the "spawn" method: MuJoCo's GL context and SAPIEN's renderer must not be
inherited through fork, and the parent may hold TensorFlow or CUDA state.
"""
from __future__ import annotations

import os
import traceback

import numpy as np

from .env_factory import make_env
from .policy_factory import make_policy
from .rollout import run_episode
from ..video import safe_name, upscale, write_video


def _limit_threads(cfg: dict) -> None:
    """Give torch/OpenMP in each worker cores // (2 * workers) threads (at least 1), leaving the rest
    to the software renderer. Only effective before torch is imported (i.e. in spawned workers and
    fresh CLI processes); OMP_NUM_THREADS set by the user wins. Measured on 2 cores, tiny model, 1
    worker: 2 threads 7-15 episodes/min, 1 thread 23 (llvmpipe and OpenMP fight over the cores)."""
    workers = max(1, int(cfg.get("workers") or 1))
    threads = cfg.get("threads_per_worker") or max(1, (os.cpu_count() or 1) // (2 * workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(int(threads)))


class EpisodeRunner:
    def __init__(self, cfg: dict, policy=None):
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo; only effective before mujoco is imported
        _limit_threads(cfg)
        self.cfg = cfg
        self.policy = policy if policy is not None else make_policy(cfg["policy"], cfg)
        self._owns_policy = policy is None
        self.envs: dict = {}

    def run(self, ep: dict) -> dict:
        env_cfg = self.cfg["env"]
        env = self.envs.get(ep["task"])
        if env is None:
            env = self.envs[ep["task"]] = make_env(env_cfg, ep["task"], self.cfg.get("max_episode_steps"))
        rec, frames = run_episode(env, self.policy, ep, env_cfg.get("success_mode", "final_step"),
                                  record_frames=bool(ep.get("video")))
        if frames:
            name = f"{safe_name(ep['episode_id'])}_{'success' if rec['success'] else 'failure'}.{self.cfg.get('video_format', 'mp4')}"
            path = os.path.join(self.cfg["out_dir"], "videos", safe_name(ep["task"]), name)
            fps = int(self.cfg.get("video_fps") or env.metadata.get("render_fps", 10))
            # a 64x64 policy's frames play as a postage stamp: upscale (nearest, integer factor) as predict does
            frames = upscale(np.stack(frames))
            rec["video"] = os.path.relpath(write_video(path, frames, fps=min(fps, 30)), self.cfg["out_dir"])
        return rec

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs.clear()
        close = getattr(self.policy, "close", None)
        if self._owns_policy and callable(close):
            close()


def _forward_messages(results) -> None:
    """A worker's warnings and log lines go to the parent, which prints each distinct one once:
    every worker loads the same policy, so N workers would otherwise print each line N times."""
    import logging
    import warnings

    from ..cli import short_warnings

    short_warnings()

    class ToParent(logging.Handler):
        def emit(self, record):
            try:
                results.put(("log", (record.name, record.levelno, record.getMessage()), None))
            except Exception:  # a message must never cost an episode
                pass

    logging.getLogger().addHandler(ToParent())

    def show(message, category, filename, lineno, file=None, line=None):
        results.put(("warning", warnings.formatwarning(message, category, filename, lineno, line), None))

    warnings.showwarning = show


def worker_main(cfg: dict, jobs, results) -> None:
    """Process entry: run episodes from `jobs` until None; report ("record"|"error"|"fatal", ...),
    and its warnings and log lines ("warning"|"log", ...)."""
    _forward_messages(results)
    try:
        runner = EpisodeRunner(cfg)
    except Exception as e:
        # Bad input (ValueError incl. DataError/ObservationError, a missing file) is said in one line.
        results.put(("fatal", (isinstance(e, (ValueError, FileNotFoundError)), str(e)), traceback.format_exc()))
        return
    try:
        while True:
            ep = jobs.get()
            if ep is None:
                break
            try:
                results.put(("record", runner.run(ep), None))
            except Exception:
                results.put(("error", ep["key"], traceback.format_exc()))
    finally:
        runner.close()
        results.put(("exit", None, None))
