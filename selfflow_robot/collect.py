"""Meta-World demonstrations: scripted experts -> rendered episodes -> episode store.

    python -m selfflow_robot.collect env=metaworld tasks=mt10 episodes_per_task=20
    python -m selfflow_robot.collect tasks=[reach-v3,push-v3] episodes_per_task=5 out=/tmp/mw

Each episode is one seed of one task (key "<task>/seed<k>"); only successful episodes are
kept unless keep_failures=true, and a task tries up to max_attempts_factor x N seeds. Workers are
`spawn` processes (MuJoCo rendering must never share a process with TensorFlow, and fork
breaks EGL contexts). Resuming skips stored keys, so re-running adds only what is missing.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context

import numpy as np

from .fileio import write_json_atomic

os.environ.setdefault("MUJOCO_GL", "egl")  # must precede the first mujoco import
_ENVS: dict = {}  # per worker process: task -> (env, expert), the most recent _KEEP_ENVS tasks
_KEEP_ENVS = 2  # a Meta-World env with its renderer holds ~100-200 MB


def resolve_tasks(tasks) -> list[str]:
    """'mt10' | 'mt50' | 'reach-v3' | 'reach-v3,push-v3' | a list of names -> list of names."""
    from selfflow_robot.envs.metaworld import MT10_TASKS, MT50_TASKS, TASK_INSTRUCTIONS

    if tasks is None:
        return list(MT10_TASKS)
    if isinstance(tasks, str):
        named = {"mt10": MT10_TASKS, "mt50": MT50_TASKS}.get(tasks.strip().lower())
        tasks = list(named) if named else [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(dict.fromkeys(str(t) for t in tasks))  # de-duplicated, order kept
    unknown = [t for t in tasks if t not in TASK_INSTRUCTIONS]
    if unknown:
        raise ValueError(f"unknown Meta-World task(s) {unknown}; use mt10, mt50 or names such as reach-v3")
    return tasks


def _episode_meta(image_size, camera, action_repeat, tasks, state_mode="proprio", drop_actions=False) -> dict:
    from selfflow_robot.envs.metaworld import TASK_INSTRUCTIONS

    if drop_actions:  # an action-free video corpus: frames and instructions only (no actions, no state)
        return dict(image_shape=[int(image_size[0]), int(image_size[1]), 3], action_dim=0, state_dim=0,
                    embedding_dim=0, fps=80.0 / action_repeat, source="metaworld_video", camera=camera,
                    action_repeat=int(action_repeat), instructions={t: TASK_INSTRUCTIONS[t] for t in tasks})
    full = state_mode == "full"  # the raw 39-d observation (hand, objects, goal) instead of hand + gripper
    names = [f"obs_{i}" for i in range(39)] if full else ["hand_x", "hand_y", "hand_z", "gripper_open"]
    return dict(image_shape=[int(image_size[0]), int(image_size[1]), 3], action_dim=4, state_dim=len(names),
                embedding_dim=0, fps=80.0 / action_repeat, source="metaworld", camera=camera,
                action_repeat=int(action_repeat), action_names=["dx", "dy", "dz", "gripper"],
                action_mask=[True, True, True, False], state_names=names, state_mode=state_mode,
                instructions={t: TASK_INSTRUCTIONS[t] for t in tasks})


def rollout(task: str, seed: int, image_size=(128, 128), camera: str = "corner", action_repeat: int = 4,
            max_steps: int = 60, state_mode: str = "proprio") -> dict:
    """One expert episode: T steps of (image before the action, action, state)."""
    from selfflow_robot.envs.metaworld import MetaWorldEnv, make_expert

    cached = _ENVS.get(task)
    if cached is None or cached[0].image_size != tuple(image_size) or cached[0].camera != camera \
            or cached[0].action_repeat != action_repeat or cached[0].state_mode != state_mode:
        if cached is not None:
            cached[0].close()
        env = MetaWorldEnv(task, image_size=tuple(image_size), camera=camera, action_repeat=action_repeat,
                           max_episode_steps=max_steps, state_mode=state_mode)
        cached = _ENVS[task] = (env, make_expert(task))
        while len(_ENVS) > _KEEP_ENVS:
            _ENVS.pop(next(iter(_ENVS)))[0].close()
    env, expert = cached
    env.max_episode_steps = int(max_steps)
    obs, _ = env.reset(seed=int(seed))
    images, actions, states, success = [], [], [], False
    for _ in range(max_steps):
        a = expert(env)
        images.append(obs["image"])
        states.append(obs["state"])
        actions.append(a)
        obs, _, _, truncated, info = env.step(a)
        if info["success"]:
            success = True
            break
        if truncated:
            break
    return dict(task=task, seed=int(seed), success=success, images=np.stack(images),
                actions=np.stack(actions).astype(np.float32), state=np.stack(states).astype(np.float32),
                instruction=obs["instruction"])


def collect_metaworld(out: str, tasks="mt10", episodes_per_task: int = 10, image_size=(128, 128),
                      camera: str = "corner", action_repeat: int = 4, max_steps: int = 60, workers: int = 0,
                      seed: int = 0, resume: bool = True, keep_failures: bool = False,
                      max_attempts_factor: int = 3, progress: bool = True, state_mode: str = "proprio",
                      drop_actions: bool = False) -> dict:
    """Collect into the episode store at `out`; returns a summary dict. workers=0 runs in-process.
    drop_actions=True writes an action-free video corpus (the experts still act; only the frames
    they render, as the policy's camera sees them, and the instructions are kept)."""
    from tqdm import tqdm

    from selfflow_robot.data.store import EpisodeWriter

    tasks = resolve_tasks(tasks)
    meta = _episode_meta(image_size, camera, action_repeat, tasks, state_mode, drop_actions)
    kw = dict(image_size=tuple(int(x) for x in image_size), camera=camera, action_repeat=int(action_repeat),
              max_steps=int(max_steps), state_mode=state_mode)
    summary = {"stored": 0, "already_stored": 0, "failed": 0, "tasks_short": {}}
    with EpisodeWriter(out, meta, resume=resume) as writer:
        # Per task: how many are still needed and which seed comes next. Seeds are tried in
        # order, so a resumed collection finds exactly the same episodes as an uninterrupted one.
        need, next_seed, tried = {}, {}, {}
        for t in tasks:
            have = sum(writer.has(f"{t}/seed{seed + k:06d}") for k in range(episodes_per_task * max_attempts_factor))
            need[t] = max(0, episodes_per_task - have)
            summary["already_stored"] += min(have, episodes_per_task)
            next_seed[t], tried[t] = seed, 0
        bar = tqdm(total=sum(need.values()), desc="collect", unit="ep", disable=not progress, file=sys.stderr)

        def jobs_for(t):
            while need[t] > 0 and tried[t] < episodes_per_task * max_attempts_factor:
                s = next_seed[t]
                next_seed[t] += 1
                tried[t] += 1
                if not writer.has(f"{t}/seed{s:06d}"):
                    return s
            return None

        def store(ep):
            t = ep["task"]
            if need[t] <= 0:
                return
            if ep["success"] or keep_failures:
                actions, state = ep["actions"], ep["state"]
                if drop_actions:
                    actions, state = np.zeros((len(actions), 0), np.float32), None
                writer.add(key=f"{t}/seed{ep['seed']:06d}", images=ep["images"], actions=actions,
                           state=state, instruction=ep["instruction"], source=f"metaworld:{t}")
                need[t] -= 1
                summary["stored"] += 1
                bar.update(1)
            else:
                summary["failed"] += 1

        if workers <= 0:
            for t in tasks:
                while (s := jobs_for(t)) is not None:
                    store(rollout(t, s, **kw))
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                pending, inflight = {}, dict.fromkeys(tasks, 0)

                def submit(t):
                    s = jobs_for(t) if inflight[t] < need[t] else None
                    if s is not None:
                        pending[pool.submit(rollout, t, s, **kw)] = t
                        inflight[t] += 1
                # Task-major submission: workers stay on one task (one env build per task and
                # worker); a failed seed is replaced by the next one when it comes back.
                for t in tasks:
                    for _ in range(need[t]):
                        submit(t)
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        t = pending.pop(f)
                        inflight[t] -= 1
                        store(f.result())
                        submit(t)
        bar.close()
    summary["tasks_short"] = {t: n for t, n in need.items() if n > 0}
    if summary["tasks_short"]:
        print(f"[collect] warning: not enough successful episodes for {summary['tasks_short']} "
              f"after {max_attempts_factor}x attempts", file=sys.stderr)
    summary["out"] = out
    return summary


def main(cfg) -> dict:
    import json

    from omegaconf import DictConfig, OmegaConf

    env = cfg.get("env")  # the env config group when present (configs/env/*.yaml), else absent
    env_name = env.get("name", "metaworld") if isinstance(env, DictConfig) else (env or "metaworld")
    if env_name != "metaworld":
        raise ValueError(f"collect supports env=metaworld only, got env={env_name}")

    from selfflow_robot.data.sources import store_path

    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("env", None)
    # Default: the very store that `dataset=metaworld` with the same settings opens.
    out = c.get("out") or store_path(dict(c, name="metaworld", source="metaworld", store_dir=None))
    summary = collect_metaworld(
        out=out, tasks=c["tasks"],
        episodes_per_task=int(cfg.episodes_per_task), image_size=list(cfg.image_size), camera=cfg.camera,
        action_repeat=int(cfg.action_repeat), max_steps=int(cfg.max_steps), workers=int(cfg.workers),
        seed=int(cfg.seed), resume=bool(cfg.resume), keep_failures=bool(cfg.keep_failures),
        progress=bool(cfg.progress), state_mode=str(cfg.get("state_mode") or "proprio"))
    # Finished, as a conversion would mark it: `dataset=metaworld` then opens this store as is.
    write_json_atomic(os.path.join(out, "conversion.json"), {"complete": True, "config": c, "summary": summary})
    print(json.dumps(summary))
    return summary


def cli() -> None:
    from selfflow_robot.cli import run

    run("collect", main)


if __name__ == "__main__":
    cli()
