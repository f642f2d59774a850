"""Build the env for one task from the `env` config group."""
from __future__ import annotations

_META_KEYS = ("image_size", "camera", "include_state", "action_repeat", "state_mode", "render_shadows")
_SIMPLER_KEYS = ("setting", "action_mode", "image_size", "include_state", "success_mode", "backend", "renderer_kwargs")


def make_env(env_cfg: dict, task: str, max_episode_steps: int | None):
    name = env_cfg["name"]
    if name == "metaworld":
        from selfflow_robot.envs.metaworld import MetaWorldEnv
        kw = {k: env_cfg[k] for k in _META_KEYS if env_cfg.get(k) is not None}
        return MetaWorldEnv(task=task, max_episode_steps=max_episode_steps, **kw)
    if name == "simpler":
        from selfflow_robot.envs.simpler import SimplerGym
        kw = {k: env_cfg[k] for k in _SIMPLER_KEYS if env_cfg.get(k) is not None}
        plan = "official" if env_cfg.get("episode_plan", "official") == "official" else None
        extra = dict(env_cfg.get("env_kwargs") or {})  # e.g. scene_name: overrides every plan entry
        clash = sorted(set(extra) & set(kw))
        if clash:
            raise ValueError(f"env.env_kwargs: {clash} are env.* keys of their own; set them there")
        return SimplerGym(task, variant=env_cfg.get("variants"), episode_plan=plan,
                          max_episode_steps=max_episode_steps, **kw, **extra)
    raise ValueError(f"unknown env '{name}'; expected metaworld or simpler")
