"""The list of episodes an evaluation runs: stable keys (for resume), seeds, video flags, shards."""
from __future__ import annotations

import difflib
import os

DEFAULT_EPISODES = 10  # Meta-World seeds per task, SIMPLER prepackaged draws per task


def check_names(names: list[str], known, what: str, key: str) -> list[str]:
    """Refuse a name not in `known` (a mistyped task would otherwise fail in every episode, after
    run.json was written), suggesting the closest one."""
    known = list(known)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"{key}: unknown {what} '{name}'; {hint}expected one of: {', '.join(known)}")
    return names


def metaworld_tasks(env_cfg: dict) -> list[str]:
    from selfflow_robot.envs import metaworld

    tasks = env_cfg.get("tasks") or "mt10"
    if tasks in ("mt10", "MT10", "mt50", "MT50"):
        return list(metaworld.MT10_TASKS if tasks.lower() == "mt10" else metaworld.MT50_TASKS)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    return check_names(tasks, metaworld.MT50_TASKS, "Meta-World task", "env.tasks")


def simpler_tasks(env_cfg: dict) -> list[str]:
    from selfflow_robot.envs.simpler_tasks import TASKS

    tasks = env_cfg.get("tasks") or env_cfg.get("task")
    if not tasks:
        raise ValueError("env.task: no SIMPLER task given (env.task=NAME or env.tasks=[A,B])")
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    return check_names(tasks, TASKS, "SIMPLER task", "env.tasks" if env_cfg.get("tasks") else "env.task")


def simpler_episode_seed(env_cfg: dict) -> int | None:
    """`env.episode_seed`: "official" (default) -> None, i.e. the official evaluator's randomness (a
    fresh env's unseeded reset; SimplerGym.reset(seed=None)); an integer -> that env seed for every
    episode of an official plan."""
    value = env_cfg.get("episode_seed", "official")
    if value is None or value == "official":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"env.episode_seed={value!r}: expected 'official' or an integer seed")
    return int(value)


def episodes_per_task(cfg: dict) -> int | None:
    """`episodes_per_task`: None (unset) means the env's default; otherwise a positive count."""
    n = cfg.get("episodes_per_task")
    if n is None:
        return None
    try:
        count = None if isinstance(n, bool) or int(n) != n else int(n)
    except (TypeError, ValueError):
        count = None
    if count is None or count < 1:
        raise ValueError(f"episodes_per_task={n}: must be a positive whole number, or null for the default "
                         f"({DEFAULT_EPISODES}; a SIMPLER official plan's whole grid)")
    return count


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
    env_cfg, n, seed = cfg["env"], episodes_per_task(cfg), int(cfg.get("seed", 0))
    out: list[dict] = []
    if env_cfg["name"] == "metaworld":
        for task in metaworld_tasks(env_cfg):
            for i in range(DEFAULT_EPISODES if n is None else n):
                s = seed + i
                out.append(dict(key=f"{task}|seed={s}", task=task, subtask=task, variant="default",
                                episode_id=f"seed={s}", seed=s))
    elif env_cfg["name"] == "simpler":
        from selfflow_robot.envs.simpler_plans import official_plan
        env_seed = simpler_episode_seed(env_cfg)
        for task in simpler_tasks(env_cfg):
            if env_cfg.get("episode_plan", "official") == "official":
                plan = official_plan(task, env_cfg.get("setting", "visual_matching"), env_cfg.get("variants"))
                out += [dict(key=f"{task}|{plan[i]['episode_id']}", task=task, subtask=plan[i]["subtask"],
                             variant=plan[i]["variant"], episode_id=plan[i]["episode_id"], seed=seed,
                             env_seed=env_seed, plan_idx=i)
                        for i in spread(len(plan), n)]
            else:  # the prepackaged random draw, one seed per episode
                out += [dict(key=f"{task}|seed={seed + i}", task=task, subtask=task, variant="prepackaged",
                             episode_id=f"seed={seed + i}", seed=seed + i)
                        for i in range(DEFAULT_EPISODES if n is None else n)]
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
