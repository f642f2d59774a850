"""Gymnasium adapter over SIMPLER (SimplerEnv / ManiSkill2_real2sim).

    env = SimplerGym("google_robot_pick_coke_can", episode_plan="official")
    obs, info = env.reset(options={"episode_idx": 0})   # obs: image, instruction, (state)
    obs, r, terminated, truncated, info = env.step(action7)  # info["episode_success"] at the end

Imports without SIMPLER (and without torch): the backend is imported when an env is built, and a
missing install raises an ImportError that says how to install it. Works with numpy 1.24 and
gymnasium 0.29 (SimplerEnv's pins) as well as current versions. Usage and conventions: docs/evaluation.md
("SIMPLER adapter").
"""
from __future__ import annotations

import importlib
import json
import os
import string
from typing import Any

import gymnasium as gym
import numpy as np

from .rotations import relative_pose
from .simpler_actions import ACTION_MODES, ActionConverter, mode_bounds
from .simpler_plans import official_plan
from .simpler_tasks import ROBOT_SETUP, get_task

SUCCESS_MODES = ("final_step", "any_step", "early_stop")
INSTALL_HINT = (
    "SIMPLER is not installed in this Python environment (module '{mod}' not found). It is not on "
    "PyPI and needs its own venv (Python 3.10/3.11, numpy<2, gymnasium<1.0, sapien==2.2.2, Vulkan):\n"
    "  git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules\n"
    "  pip install numpy==1.24.4 -e SimplerEnv/ManiSkill2_real2sim -e SimplerEnv\n"
    "  pip install -e <selfflow-robot> --no-deps   # adapter + light client only, no torch\n"
    "Then serve the policy from the main env (python -m selfflow_robot.serve) and evaluate with "
    "policy=ws://HOST:PORT. See docs/evaluation.md.")
_CHARSET = string.printable
# The episode seed of every episode of SimplerEnv's official evaluator: it builds a fresh env per
# episode (ManiSkill2's constructor seeds the main RNG with 2022) and resets it without a seed, so
# the episode seed is the main RNG's first draw. Resetting a kept env with this seed places
# everything (e.g. the variant-aggregation distractors) where the official run does, without the
# rebuild (tests/test_simpler_real.py compares both against the real env).
OFFICIAL_EPISODE_SEED = int(np.random.RandomState(2022).randint(2 ** 32))


def load_backend(name: str = "mani_skill2_real2sim"):
    """Import the SIMPLER backend package (it registers the gym ids); clear error if missing."""
    try:
        pkg = importlib.import_module(name)
        importlib.import_module(f"{name}.envs")
    except ModuleNotFoundError as e:
        if e.name and name.split(".")[0] == e.name.split(".")[0]:
            raise ImportError(INSTALL_HINT.format(mod=name)) from e
        raise
    return pkg


def _resize(img: np.ndarray, hw) -> np.ndarray:
    """Resize in numpy (no cv2/PIL needed in SIMPLER venvs): block averaging for integer
    downscales (e.g. 512x640 -> 256x320, RT-1's input), nearest pixel centre otherwise."""
    h, w = int(hw[0]), int(hw[1])
    if img.shape[:2] == (h, w):
        return img
    H, W = img.shape[:2]
    if H % h == 0 and W % w == 0:
        fy, fx = H // h, W // w
        blocks = img.reshape(h, fy, w, fx, img.shape[2]).astype(np.float32)
        return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)
    ys = ((np.arange(h) + 0.5) * H / h).astype(np.int64)
    xs = ((np.arange(w) + 0.5) * W / w).astype(np.int64)
    return np.ascontiguousarray(img[ys][:, xs])


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


class SimplerGym(gym.Env):
    """One SIMPLER task as a Gymnasium env with our observation / action / success conventions.

    episode_plan: None -> the prepackaged random draw (`prepackaged_config=True`, one random
      configuration per reset: a quick visual-matching proxy); "official" -> the paper's grid for
      `setting` / `variant` (simpler_plans.official_plan); or an explicit list of plan entries.
      With a plan, `reset(options={"episode_idx": i})` runs entry i (default: the next one); the
      underlying env is rebuilt only when the entry's build kwargs change. `reset(seed=None)` on a
      plan episode uses OFFICIAL_EPISODE_SEED (the official evaluator's randomness); an integer
      seed is passed to the env as given. `info["episode_seed"]` says which.
    success_mode: "final_step" (official: success at the last executed step, no early stop),
      "any_step" (success at any step, no early stop), "early_stop" (end at first success).
      The result is `info["episode_success"]`; `info["success"]` is the env's per-step flag.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 3}

    def __init__(self, task: str, setting: str = "visual_matching", variant=None, episode_plan=None,
                 action_mode: str = "env", image_size=None, include_state: bool = False,
                 success_mode: str = "final_step", max_episode_steps: int | None = None,
                 renderer_kwargs: dict | None = None, backend: str = "mani_skill2_real2sim",
                 render_mode: str | None = "rgb_array", **env_kwargs):
        self.spec_task = get_task(task)
        if action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got '{action_mode}'")
        if success_mode not in SUCCESS_MODES:
            raise ValueError(f"success_mode must be one of {SUCCESS_MODES}, got '{success_mode}'")
        self.task, self.setting, self.variant = task, setting, variant
        self.action_mode, self.success_mode, self.include_state = action_mode, success_mode, include_state
        self.backend, self.render_mode = backend, render_mode
        self.renderer_kwargs = dict(renderer_kwargs if renderer_kwargs is not None else {"offscreen_only": True})
        self.env_kwargs = dict(env_kwargs)
        self.max_episode_steps = max_episode_steps
        if episode_plan == "official":
            episode_plan = official_plan(task, setting, variant)
        elif episode_plan is None and (setting != "visual_matching" or variant is not None):
            raise ValueError("the prepackaged random draw is visual matching only; use episode_plan='official' "
                             "for variant aggregation or a specific variant")
        self.plan = list(episode_plan) if episode_plan is not None else None
        self._next_idx = 0
        setup = ROBOT_SETUP[self.spec_task.robot]
        self.metadata = {**self.metadata, "render_fps": setup["control_freq"]}
        self.camera = setup["camera"]
        self.image_hw = tuple(image_size) if image_size is not None else setup["image_hw"]
        spaces = {"image": gym.spaces.Box(0, 255, (*self.image_hw, 3), np.uint8),
                  "instruction": gym.spaces.Text(max_length=256, charset=_CHARSET)}
        if include_state:  # base-relative TCP pose (xyz + wxyz quaternion) + gripper closedness
            spaces["state"] = gym.spaces.Box(-np.inf, np.inf, (8,), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        low, high = mode_bounds(action_mode, self.spec_task.robot)
        self.action_space = gym.spaces.Box(low, high, dtype=np.float32)
        self._convert = ActionConverter(action_mode, self.spec_task.robot)
        load_backend(backend)  # fail at construction, with install instructions, if SIMPLER is missing
        self._env = None
        self._env_key: str | None = None
        self._episode: dict | None = None
        self._image: np.ndarray | None = None
        self._instruction = ""
        self._ever_success = False
        self._terminate_requested = False
        self._episode_seed: int | str | None = None

    # -- building ------------------------------------------------------------------------
    @property
    def unwrapped_sim(self):
        """The ManiSkill2_real2sim env (`env.unwrapped` of the inner gym env)."""
        if self._env is None:
            raise RuntimeError("call reset() first")
        return self._env.unwrapped

    def _make(self, env_id: str, kwargs: dict, max_steps: int):
        key = json.dumps([env_id, kwargs, max_steps], sort_keys=True, default=str)
        if self._env is not None and key == self._env_key:
            return
        self._close_inner()
        pkg = load_backend(self.backend)
        kw = json.loads(json.dumps(kwargs, default=str))  # deep copy: never share dicts with the caller
        if kw.get("rgb_overlay_path") and not os.path.isabs(kw["rgb_overlay_path"]):
            kw["rgb_overlay_path"] = os.path.join(str(pkg.ASSET_DIR), kw["rgb_overlay_path"])
        kw.setdefault("renderer_kwargs", dict(self.renderer_kwargs))
        kw.update(self.env_kwargs)
        namespace = getattr(pkg, "GYM_NAMESPACE", None)  # the test double registers under its own
        full_id = f"{namespace}/{env_id}" if namespace else env_id
        self._env = gym.make(full_id, max_episode_steps=max_steps, **kw)
        self._env_key = key

    def _step_limit(self, task_default: int) -> int:
        """Steps per episode: max_episode_steps= given to this class, else Gymnasium's own
        (gym.make(ID, max_episode_steps=N) records N in self.spec; its TimeLimit alone could only
        cut episodes shorter), else the task's (the paper's 80/113/200/60/120). reset's info says which."""
        gym_limit = getattr(self, "gym_max_episode_steps", None)  # set by envs.EpisodeLimitFromMake
        limit = self.max_episode_steps or gym_limit or task_default
        self._limit_info = {"max_episode_steps": int(limit), "max_episode_steps_from":
                            "max_episode_steps" if self.max_episode_steps else "gym.make" if gym_limit else "task"}
        return int(limit)

    def _build_for(self, options: dict) -> dict:
        """Build (or keep) the env for the next episode; return the reset options for it."""
        t = self.spec_task
        if self.plan is None:
            kw = dict(obs_mode="rgbd", prepackaged_config=True, **t.env_kwargs())
            self._make(t.env_id, kw, self._step_limit(t.max_episode_steps))
            self._episode = {"task": self.task, "subtask": self.task, "variant": "prepackaged", "episode_id": None}
            return {k: v for k, v in options.items() if k != "episode_idx"}
        idx = int(options.get("episode_idx", self._next_idx))
        if not 0 <= idx < len(self.plan):
            raise IndexError(f"episode_idx {idx} out of range for a plan of {len(self.plan)} episodes")
        self._next_idx = (idx + 1) % len(self.plan)
        entry = self.plan[idx]
        self._make(entry["env_id"], entry["build"], self._step_limit(entry["max_episode_steps"]))
        self._episode = {k: entry[k] for k in ("task", "subtask", "variant", "episode_id")}
        reset_opts = json.loads(json.dumps(entry["options"]))
        reset_opts.update({k: v for k, v in options.items() if k != "episode_idx"})
        return reset_opts

    # -- observations --------------------------------------------------------------------
    def _observe(self, raw_obs: dict) -> dict:
        self._image = _resize(np.asarray(raw_obs["image"][self.camera]["rgb"], dtype=np.uint8), self.image_hw)
        self._instruction = str(self.unwrapped_sim.get_language_instruction())
        obs = {"image": self._image, "instruction": self._instruction}
        if self.include_state:
            obs["state"] = self._state()
        return obs

    def _state(self) -> np.ndarray:
        sim = self.unwrapped_sim
        base, tcp = sim.agent.robot.pose, sim.tcp.pose
        pose = relative_pose(base.p, base.q, tcp.p, tcp.q)
        return np.concatenate([pose, [self._gripper_closedness()]]).astype(np.float32)

    def _gripper_closedness(self) -> float:
        """0 open .. 1 closed, from the finger joints (Google Robot: qpos[-4:-2], the last two
        joints are the camera's pan/tilt; WidowX: qpos[-2:]), as both real agents compute it."""
        return float(self.unwrapped_sim.agent.get_gripper_closedness())

    def _info(self, raw: dict) -> dict:
        sim = self.unwrapped_sim
        info = _jsonable(dict(raw))
        info.update(self._episode or {})
        info.update(instruction=self._instruction, is_final_subtask=bool(sim.is_final_subtask()),
                    episode_seed=self._episode_seed,
                    success_mode=self.success_mode, setting=self.setting if self.plan is not None else "prepackaged")
        return info

    # -- gym API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        reset_opts = self._build_for(dict(options or {}))
        official = seed is None and self.plan is not None
        env_seed = OFFICIAL_EPISODE_SEED if official else seed
        raw_obs, raw_info = self._env.reset(seed=env_seed, options=reset_opts)
        self._episode_seed = "official" if official else seed
        self._convert.reset()
        self._ever_success, self._terminate_requested = False, False
        obs = self._observe(raw_obs)
        info = self._info(raw_info)
        info["episode_success"] = False
        info.update(self._limit_info)
        return obs, info

    def request_terminate(self) -> None:
        """The policy's "terminate episode" signal for the next step (RT-1 style)."""
        self._terminate_requested = True

    def step(self, action):
        if self._env is None:
            raise RuntimeError("call reset() before step()")
        env_action, terminate = self._convert(action)
        terminate = terminate or self._terminate_requested
        self._terminate_requested = False
        sim = self.unwrapped_sim
        if terminate and not sim.is_final_subtask():
            # Official loop: a terminate before the last subtask advances the subtask instead.
            sim.advance_to_next_subtask()
            terminate = False
        raw_obs, reward, done, truncated, raw_info = self._env.step(env_action)
        success = bool(done)  # the official evaluator's rule: the env's `done` of the last step
        self._ever_success = self._ever_success or success
        obs = self._observe(raw_obs)
        info = self._info(raw_info)
        info["policy_terminated"] = terminate
        info["env_action"] = env_action.tolist()
        if self.success_mode == "early_stop":
            terminated, episode_success = success or terminate, success
        elif self.success_mode == "any_step":
            terminated, episode_success = terminate, self._ever_success
        else:  # official: the flag at the last executed step; never stop on success
            terminated, episode_success = terminate, success
        info["episode_success"] = bool(episode_success)
        return obs, float(reward), bool(terminated), bool(truncated) and not terminated, info

    def render(self):
        return self._image

    def _close_inner(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._env_key = None, None

    def close(self):
        self._close_inner()
