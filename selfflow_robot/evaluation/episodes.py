"""The list of episodes an evaluation runs: stable keys (for resume), seeds, video flags, shards."""
from __future__ import annotations

import os


def metaworld_tasks(env_cfg: dict) -> list[str]:
    tasks = env_cfg.get("tasks") or "mt10"
    if tasks in ("mt10", "MT10", "mt50", "MT50"):
        from selfflow_robot.envs import metaworld
        return list(metaworld.MT10_TASKS if tasks.lower() == "mt10" else metaworld.MT50_TASKS)
    return [tasks] if isinstance(tasks, str) else list(tasks)


def simpler_tasks(env_cfg: dict) -> list[str]:
    tasks = env_cfg.get("tasks") or env_cfg.get("task")
    return [tasks] if isinstance(tasks, str) else list(tasks)


def spread(total: int, n: int | None) -> list[int]:
    """n indices evenly spread over range(total) (all when n is None or >= total): a quick subset of
    an official grid then still covers its variants, orientations and positions."""
    if n is None or int(n) >= total:
        return list(range(total))
    n = int(n)
    return sorted({round(i * (total - 1) / max(n - 1, 1)) for i in range(n)}) if n > 0 else []


def build_episodes(cfg: dict) -> list[dict]:
    """Every episode of the run, in a fixed order. Each dict is JSON-serialisable and has a unique
    `key`; `video` marks the first `videos_per_task` episodes of each task. SIMPLER official plans:
    all entries, or `episodes_per_task` of them spread evenly over the grid."""
    env_cfg, n, seed = cfg["env"], cfg.get("episodes_per_task"), int(cfg.get("seed", 0))
    out: list[dict] = []
    if env_cfg["name"] == "metaworld":
        for task in metaworld_tasks(env_cfg):
            for i in range(int(n or 10)):
                s = seed + i
                out.append(dict(key=f"{task}|seed={s}", task=task, subtask=task, variant="default",
                                episode_id=f"seed={s}", seed=s))
    elif env_cfg["name"] == "simpler":
        from selfflow_robot.envs.simpler_plans import official_plan
        for task in simpler_tasks(env_cfg):
            if env_cfg.get("episode_plan", "official") == "official":
                plan = official_plan(task, env_cfg.get("setting", "visual_matching"), env_cfg.get("variants"))
                out += [dict(key=f"{task}|{plan[i]['episode_id']}", task=task, subtask=plan[i]["subtask"],
                             variant=plan[i]["variant"], episode_id=plan[i]["episode_id"], seed=seed, plan_idx=i)
                        for i in spread(len(plan), n)]
            else:  # the prepackaged random draw, one seed per episode
                out += [dict(key=f"{task}|seed={seed + i}", task=task, subtask=task, variant="prepackaged",
                             episode_id=f"seed={seed + i}", seed=seed + i) for i in range(int(n or 10))]
    else:
        raise ValueError(f"unknown env '{env_cfg['name']}'; expected metaworld or simpler")
    per_task: dict[str, int] = {}
    for ep in out:
        per_task[ep["task"]] = per_task.get(ep["task"], 0) + 1
        ep["video"] = per_task[ep["task"]] <= int(cfg.get("videos_per_task", 0))
    return out


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when run directly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(episodes: list[dict], rank: int, world: int) -> list[dict]:
    """Round-robin split: every rank gets a similar mix of tasks."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    return episodes[rank::world]
