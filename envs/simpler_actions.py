"""Action conventions for SIMPLER, converted to what the SAPIEN controllers consume.

`env` mode: [dx, dy, dz] metres in the robot-base frame, an axis-angle rotation vector (rad), and
the gripper as the robot expects it (Google Robot: relative joint-target delta, +1 closes;
WidowX: absolute, +1 open / -1 closed). The arm controller does not clip, so we always do.
`eef_rpy_absgrip`: Octo / OpenVLA / pi0 outputs (delta xyz, delta roll-pitch-yaw, gripper in
[0, 1] with 1 = open); Google Robot gets Octo's 15-step sticky gripper, WidowX a binarised one.
`rt1`: raw RT-1 / fractal actions (world_vector, rotation_delta, gripper_closedness +1 = close);
on WidowX the RT-1-X rescaling, rpy rotation and gripper inversion are applied.
Any mode accepts an optional 8th element: the policy's "terminate episode" flag, on when > 0 (the
official evaluator's `terminate_episode[0] > 0`).
"""
from __future__ import annotations

import numpy as np

from .rotations import rpy_to_rotvec

ACTION_MODES = ("env", "eef_rpy_absgrip", "rt1")
ENV_LOW = np.array([-1, -1, -1, -np.pi / 2, -np.pi / 2, -np.pi / 2, -1], dtype=np.float32)
ENV_HIGH = -ENV_LOW
STICKY_GRIPPER_STEPS = 15


def mode_bounds(mode: str, robot: str = "google_robot") -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the 7-D action space the adapter exposes in `mode` (inputs are clipped to them)."""
    if mode == "rt1" and robot == "widowx":  # RT-1-X's Bridge output ranges before rescaling
        high = np.array([1.75, 1.75, 1.75, 1.4, 1.4, 1.4, 1.0], dtype=np.float32)
        return -high, high
    if mode == "eef_rpy_absgrip":
        low, high = ENV_LOW.copy(), ENV_HIGH.copy()
        low[6], high[6] = 0.0, 1.0
        return low, high
    if mode in ("env", "rt1"):
        return ENV_LOW.copy(), ENV_HIGH.copy()
    raise ValueError(f"action_mode must be one of {ACTION_MODES}, got '{mode}'")


class ActionConverter:
    """Stateful (sticky gripper) map from the policy's convention to the controller's."""

    def __init__(self, mode: str, robot: str):
        self.low, self.high = mode_bounds(mode, robot)
        if robot not in ("google_robot", "widowx"):
            raise ValueError(f"robot must be 'google_robot' or 'widowx', got '{robot}'")
        self.mode, self.robot = mode, robot
        self.reset()

    def reset(self) -> None:
        self._prev_open: float | None = None
        self._sticky_left = 0
        self._sticky_value = 0.0

    def __call__(self, action) -> tuple[np.ndarray, bool]:
        """-> (7-D env action, float64, clipped to the env's bounds; terminate flag)."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] not in (7, 8):
            raise ValueError(f"expected a 7-D action (optionally + terminate flag), got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"non-finite action {a}")
        terminate = bool(a.shape[0] == 8 and a[7] > 0)
        raw_g = float(a[6])  # Octo's sticky rule reads the model's unclipped output
        a = np.clip(a[:7], self.low, self.high)
        xyz, rot, g = a[:3], a[3:6], float(a[6])
        if self.mode == "eef_rpy_absgrip":
            rot = rpy_to_rotvec(rot)
            g = self._sticky(raw_g) if self.robot == "google_robot" else (1.0 if g > 0.5 else -1.0)
        elif self.mode == "rt1":
            if self.robot == "widowx":  # RT-1-X's Bridge un-normalisation, rpy rotation, +1 = open
                xyz = xyz / 1.75 * 0.05
                rot = rpy_to_rotvec(rot / 1.4 * 0.25)
                g = 1.0 if -g > 0.0 else -1.0
            elif abs(g) < 1e-2:  # RT-1's small-gripper-action filter
                g = 0.0
        out = np.concatenate([xyz, rot, [g]])
        return np.clip(out, ENV_LOW, ENV_HIGH), terminate

    def _sticky(self, open_cmd: float) -> float:
        """Octo's Google Robot rule (SimplerEnv `policies/octo/octo_model.py`): a change of the raw,
        unclipped open command becomes a relative close/open command repeated for 15 steps (the
        controller is relative; the env clips the result to [-1, 1] as the controller does)."""
        open_cmd = float(open_cmd)
        relative = 0.0 if self._prev_open is None else self._prev_open - open_cmd
        self._prev_open = open_cmd
        if abs(relative) > 0.5 and self._sticky_left == 0:
            self._sticky_left, self._sticky_value = STICKY_GRIPPER_STEPS, relative
        if self._sticky_left > 0:
            relative = self._sticky_value
            self._sticky_left -= 1
        return relative
