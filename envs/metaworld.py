"""Meta-World (v3 tasks) as a Gymnasium env with rendered images and instructions.

Observation: {"image": uint8[H, W, 3], "instruction": str, "state": float32[S]}; action: float32[4]
in [-1, 1] (xyz end-effector delta, gripper effort). `action_repeat` applies each action k
times so that episodes stay short (one stored / policy step = k simulator steps).

Images come from our own `mujoco.Renderer` (shadows and reflections off: ~3x faster on
llvmpipe). MuJoCo must not share a process with TensorFlow (LLVM symbol clash, segfault).
No torch import here: the env is also used by light evaluation processes.
"""
from __future__ import annotations

import atexit
import logging
import os
import string
import weakref
from typing import Any, Callable

os.environ.setdefault("MUJOCO_GL", "egl")
# PyOpenGL (MuJoCo's EGL path) logs "No OpenGL_accelerate module" at INFO on every import.
logging.getLogger("OpenGL.acceleratesupport").setLevel(logging.WARNING)

import gymnasium as gym
import numpy as np

MT10_TASKS = [
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
]

TASK_INSTRUCTIONS = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "dunk the basketball into the basket",
    "bin-picking-v3": "pick the puck from one bin and place it into the other bin",
    "box-close-v3": "grasp the lid and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button behind the wall from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "rotate the dial 180 degrees",
    "disassemble-v3": "pick the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by rotating the lock clockwise",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by rotating the lock counter-clockwise",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-close-v3": "rotate the faucet clockwise to close it",
    "faucet-open-v3": "rotate the faucet counter-clockwise to open it",
    "hammer-v3": "hammer the nail into the wall",
    "hand-insert-v3": "insert the gripper into the hole",
    "handle-press-side-v3": "press the handle down sideways",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up sideways",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever down 90 degrees",
    "peg-insert-side-v3": "insert the peg sideways into the hole",
    "peg-unplug-side-v3": "unplug the peg sideways",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "plate-slide-back-side-v3": "slide the plate sideways back into the cabinet",
    "plate-slide-back-v3": "slide the plate back into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-v3": "slide the plate into the cabinet",
    "push-back-v3": "push the puck backwards to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position behind the wall",
    "shelf-place-v3": "pick up the puck and place it onto the shelf",
    "soccer-v3": "kick the soccer ball into the goal",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "stick-push-v3": "grasp the stick and push the box with it",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-close-v3": "push the window closed",
    "window-open-v3": "push the window open",
}
MT50_TASKS = sorted(TASK_INSTRUCTIONS)

# Cameras whose MuJoCo frame has its "up" axis pointing down; rotating the picture by 180
# degrees is the same physical camera rolled upright (a flip would mirror the scene).
_UPSIDE_DOWN_CAMERAS = {"corner"}
_STATE_DIMS = {"proprio": 4, "full": 39}  # proprio: hand xyz + gripper opening
_LIVE_ENVS: "weakref.WeakSet[MetaWorldEnv]" = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_renderers() -> None:
    # A renderer freed during interpreter teardown, after MuJoCo's own atexit hook has
    # terminated the EGL display, prints EGLError noise: close ours before that hook runs.
    for env in list(_LIVE_ENVS):
        env._close_renderer()


def _check_task(task: str) -> None:
    if task not in TASK_INSTRUCTIONS:
        raise ValueError(f"unknown Meta-World task '{task}'; expected one of MT50: {', '.join(MT50_TASKS)}")


class MetaWorldEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(self, task: str = "reach-v3", image_size=(128, 128), camera: str = "corner",
                 include_state: bool = True, max_episode_steps: int | None = None,
                 render_shadows: bool = False, action_repeat: int = 1, state_mode: str = "proprio",
                 instruction: str | None = None, render_mode: str | None = "rgb_array"):
        import metaworld

        _check_task(task)
        if state_mode not in _STATE_DIMS:
            raise ValueError(f"state_mode must be one of {sorted(_STATE_DIMS)}, got '{state_mode}'")
        if action_repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
        self.task, self.camera, self.action_repeat = task, camera, int(action_repeat)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.include_state, self.state_mode, self.render_mode = include_state, state_mode, render_mode
        self.instruction = instruction or TASK_INSTRUCTIONS[task]
        # Meta-World's own episode limit is 500 simulator steps.
        self.max_episode_steps = int(max_episode_steps or -(-500 // self.action_repeat))
        self.render_shadows = render_shadows
        self.metadata = dict(self.metadata, render_fps=80.0 / self.action_repeat)  # 80 Hz control

        env = metaworld.ALL_V3_ENVIRONMENTS[task]()
        # Goal-observable, seedable random initial states (what MT-style training uses); we
        # enforce the episode limit ourselves, so lift Meta-World's hard one.
        env._partially_observable = False
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        env.max_path_length = 10**9
        if "sawyer_observation_space" in env.__dict__:
            del env.sawyer_observation_space
        self._env = env
        self._renderer = None
        self._raw_obs: np.ndarray | None = None
        self._t = 0

        h, w = self.image_size
        spaces = {"image": gym.spaces.Box(0, 255, (h, w, 3), np.uint8),
                  "instruction": gym.spaces.Text(max_length=512, charset=string.printable)}
        if include_state:
            s = _STATE_DIMS[state_mode]
            spaces["state"] = gym.spaces.Box(-np.inf, np.inf, (s,), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)

    # -- rendering -------------------------------------------------------------------------
    def _render_image(self) -> np.ndarray:
        import mujoco

        if self._renderer is None:
            h, w = self.image_size
            self._renderer = mujoco.Renderer(self._env.model, height=h, width=w)
            _LIVE_ENVS.add(self)
            global _ATEXIT_REGISTERED
            if not _ATEXIT_REGISTERED:  # registered after mujoco.egl's hook, so it runs first
                atexit.register(_close_renderers)
                _ATEXIT_REGISTERED = True
        r = self._renderer
        r.update_scene(self._env.data, camera=self.camera)
        if not self.render_shadows:
            r.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            r.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        img = r.render()
        if self.camera in _UPSIDE_DOWN_CAMERAS:
            img = img[::-1, ::-1]
        return np.ascontiguousarray(img)

    def render(self) -> np.ndarray:
        return self._render_image()

    def _obs(self) -> dict[str, Any]:
        obs = {"image": self._render_image(), "instruction": self.instruction}
        if self.include_state:
            raw = self._raw_obs
            obs["state"] = (raw[:4] if self.state_mode == "proprio" else raw).astype(np.float32)
        return obs

    @property
    def raw_observation(self) -> np.ndarray:
        """Meta-World's 39-d observation (what its scripted policies read)."""
        if self._raw_obs is None:
            raise RuntimeError("call reset() first")
        return self._raw_obs

    # -- gym API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))
        raw, _ = self._env.reset()
        self._raw_obs = np.asarray(raw, dtype=np.float64)
        self._t = 0
        if getattr(self, "gym_max_episode_steps", None):  # gym.make(..., max_episode_steps=N): N is the limit
            self.max_episode_steps = self.gym_max_episode_steps
        return self._obs(), {"success": False, "task": self.task}

    def step(self, action):
        if self._raw_obs is None:
            raise RuntimeError("call reset() before step()")
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(4), -1.0, 1.0)
        total, success, info = 0.0, False, {}
        for _ in range(self.action_repeat):
            raw, reward, _, _, info = self._env.step(a)
            total += float(reward)
            success = success or bool(info.get("success", False))
            if success:  # stop repeating once solved: the stored step ends on success
                break
        self._raw_obs = np.asarray(raw, dtype=np.float64)
        self._t += 1
        truncated = self._t >= self.max_episode_steps
        out = {k: v for k, v in info.items() if np.isscalar(v)}
        out.update(success=success, task=self.task)
        # Meta-World never terminates by itself; callers decide whether success ends an episode.
        return self._obs(), total, False, truncated, out

    def _close_renderer(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def close(self):
        self._close_renderer()
        self._env.close()


def make_expert(task: str) -> Callable[[MetaWorldEnv], np.ndarray]:
    """Meta-World's scripted policy for `task`, called on an env or a wrapper of one: `a = expert(env)`."""
    from metaworld.policies import ENV_POLICY_MAP

    _check_task(task)
    policy = ENV_POLICY_MAP[task]()

    def expert(env: MetaWorldEnv) -> np.ndarray:
        return np.clip(policy.get_action(env.unwrapped.raw_observation), -1.0, 1.0).astype(np.float32)

    return expert


ENV_ID = "selfflow/MetaWorld-v0"


def register_envs() -> None:
    """Register `selfflow/MetaWorld-v0` (kwargs as MetaWorldEnv) with Gymnasium; idempotent."""
    if ENV_ID not in gym.envs.registry:
        gym.register(id=ENV_ID, entry_point="selfflow_robot.envs.metaworld:MetaWorldEnv")
