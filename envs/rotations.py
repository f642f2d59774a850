"""Small rotation helpers (numpy only) so the SIMPLER adapter needs no transforms3d/scipy.

Quaternions are (w, x, y, z), the order SAPIEN and transforms3d use. Euler angles follow
transforms3d's default static "sxyz" convention (R = Rz(yaw) @ Ry(pitch) @ Rx(roll)), which is
what SimplerEnv's policy adapters call `euler2axangle` / `euler2quat` with.
"""
from __future__ import annotations

import numpy as np


def quat_mul(a, b) -> np.ndarray:
    """Hamilton product a * b (apply b first, then a)."""
    w1, x1, y1, z1 = np.asarray(a, dtype=np.float64)
    w2, x2, y2, z2 = np.asarray(b, dtype=np.float64)
    return np.array([
        w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
    ])


def quat_conj(q) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return np.array([q[0], -q[1], -q[2], -q[3]])


def quat_rotate(q, v) -> np.ndarray:
    """Rotate vector v by unit quaternion q."""
    qv = np.concatenate([[0.0], np.asarray(v, dtype=np.float64)])
    return quat_mul(quat_mul(q, qv), quat_conj(q))[1:]


def euler2quat(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Static-axes xyz Euler angles -> quaternion (transforms3d `euler2quat(r, p, y)`)."""
    def axis_quat(axis: int, angle: float) -> np.ndarray:
        q = np.zeros(4)
        q[0] = np.cos(angle / 2)
        q[1 + axis] = np.sin(angle / 2)
        return q
    return quat_mul(axis_quat(2, yaw), quat_mul(axis_quat(1, pitch), axis_quat(0, roll)))


def quat_to_rotvec(q) -> np.ndarray:
    """Unit quaternion -> rotation vector (axis * angle, angle in [0, pi])."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q)
    if q[0] < 0:  # same rotation, shortest angle
        q = -q
    s = np.linalg.norm(q[1:])
    if s < 1e-12:
        return np.zeros(3)
    angle = 2.0 * np.arctan2(s, q[0])
    return q[1:] / s * angle


def rpy_to_rotvec(rpy) -> np.ndarray:
    """Roll-pitch-yaw delta -> axis-angle rotation vector (what SIMPLER's controllers take)."""
    r, p, y = np.asarray(rpy, dtype=np.float64).reshape(3)
    return quat_to_rotvec(euler2quat(r, p, y))


def relative_pose(base_p, base_q, p, q) -> np.ndarray:
    """Pose of (p, q) in the frame (base_p, base_q): base.inv() * pose, as [x, y, z, qw, qx, qy, qz]."""
    inv = quat_conj(base_q)
    rel_p = quat_rotate(inv, np.asarray(p, dtype=np.float64) - np.asarray(base_p, dtype=np.float64))
    rel_q = quat_mul(inv, q)
    if rel_q[0] < 0:
        rel_q = -rel_q
    return np.concatenate([rel_p, rel_q])
