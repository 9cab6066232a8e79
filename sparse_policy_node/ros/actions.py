"""From a model's action chunk to what a robot controller takes, through the safety layer.

Pure numpy (no rclpy): quaternions (x, y, z, w, ROS order), the safety limits, the
integration of end-effector deltas into absolute pose targets, and the latency-aware start of
absolute targets. The policy node builds messages from what these functions return.

Safety limits (all off by default; a limited action is counted, never an error):

- ``max_step_change``: per action dimension, consecutive actions differ by at most this
  (continuing from the action in force when the chunk starts);
- ``max_linear_speed`` / ``max_angular_speed``: the end-effector target moves at most
  ``v * dt`` per step (delta and pose-target outputs);
- ``max_joint_speed``: each joint target moves at most ``v * dt`` per step (joint output);
- ``workspace_min`` / ``workspace_max``: end-effector position targets are kept in this box
  (in the pose frame); for delta output the integrated position is kept in it and the delta
  shortened accordingly.
"""

from dataclasses import dataclass
from typing import Optional
from typing import Tuple

import numpy as np


# ==== quaternions (x, y, z, w) ====

def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a * b of (x, y, z, w) quaternions."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw,
                     aw * bw - ax * bx - ay * by - az * bz])


def quat_conj(q: np.ndarray) -> np.ndarray:
    """Return the inverse of a unit quaternion."""
    return np.array([-q[0], -q[1], -q[2], q[3]])


def quat_from_rotvec(v: np.ndarray) -> np.ndarray:
    """Return the unit quaternion of an axis-angle vector (angle = norm, in rad)."""
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.array([0.0, 0.0, 0.0, 1.0])
    axis = np.asarray(v, dtype=float) / angle
    return np.concatenate([axis * np.sin(angle / 2), [np.cos(angle / 2)]])


def rotvec_from_quat(q: np.ndarray) -> np.ndarray:
    """Return the axis-angle vector (shortest rotation) of a unit quaternion."""
    q = np.asarray(q, dtype=float)
    if q[3] < 0:
        q = -q
    s = float(np.linalg.norm(q[:3]))
    if s < 1e-12:
        return np.zeros(3)
    return q[:3] / s * 2.0 * np.arctan2(s, q[3])


def quat_from_matrix(m: np.ndarray) -> np.ndarray:
    """Return the unit quaternion of a rotation matrix."""
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4]
    else:
        i = int(np.argmax([m[0, 0], m[1, 1], m[2, 2]]))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0, 0.0, 0.0, (m[k, j] - m[j, k]) / s]
        q[i], q[j], q[k] = s / 4, (m[j, i] + m[i, j]) / s, (m[k, i] + m[i, k]) / s
    q = np.asarray(q)
    return q / np.linalg.norm(q)


def quat_from_rotation(values: np.ndarray, fmt: str) -> np.ndarray:
    """Return the unit quaternion of an ``axis_angle``, ``quat_xyzw`` or ``rotation_6d``.

    ``rotation_6d`` is the first two columns of the rotation matrix (Zhou et al., as
    Diffusion Policy's ``RotationTransformer`` stores them), orthonormalized here.
    """
    values = np.asarray(values, dtype=float)
    if fmt == 'axis_angle':
        return quat_from_rotvec(values)
    if fmt == 'quat_xyzw':
        n = np.linalg.norm(values)
        if not n > 1e-9:
            raise ValueError('zero quaternion in an action')
        return values / n
    a, b = values[:3], values[3:6]
    x = a / np.linalg.norm(a)
    b = b - x * np.dot(x, b)
    y = b / np.linalg.norm(b)
    return quat_from_matrix(np.stack([x, y, np.cross(x, y)], axis=1))


# ==== safety limits ====

@dataclass
class Limits:
    """The safety layer's limits; zero / infinite values switch a limit off."""

    dt: float
    max_step_change: Optional[np.ndarray] = None   # (A,) or None
    max_linear_speed: float = 0.0                  # m/s
    max_angular_speed: float = 0.0                 # rad/s
    max_joint_speed: float = 0.0                   # rad/s
    workspace_min: Optional[np.ndarray] = None     # (3,)
    workspace_max: Optional[np.ndarray] = None     # (3,)


def _cap_norm(v: np.ndarray, limit: float) -> Tuple[np.ndarray, bool]:
    n = float(np.linalg.norm(v))
    if limit > 0 and n > limit:
        return v * (limit / n), True
    return v, False


def _box(p: np.ndarray, limits: Limits) -> Tuple[np.ndarray, bool]:
    if limits.workspace_min is None:
        return p, False
    q = np.clip(p, limits.workspace_min, limits.workspace_max)
    return q, bool(not np.allclose(q, p))


def clamp_to_box(p: np.ndarray, limits: Limits) -> np.ndarray:
    """Return ``p`` clamped into the workspace box (unchanged without one)."""
    return _box(np.asarray(p, float), limits)[0]


def integrate_deltas(actions: np.ndarray, p0: np.ndarray, q0: np.ndarray, pos_scale: float,
                     rot_scale: float, limits: Limits):
    """Integrate end-effector deltas from a measured pose into limited absolute targets.

    Target k is the pose after actions 0..k, each applied to the previous target (so an
    action is applied exactly once, whenever the chunk arrives). Speed caps and the workspace
    box act on the targets; the returned deltas are the limited ones (same scaling).

    Returns:
        positions (n, 3), quaternions (n, 4), limited actions (n, A), steps limited.
    """
    n = len(actions)
    pos, quat, out = np.zeros((n, 3)), np.zeros((n, 4)), actions.copy()
    p, q, count = np.asarray(p0, float), np.asarray(q0, float), 0
    for k in range(n):
        dp, capped = _cap_norm(actions[k, :3] * pos_scale, limits.max_linear_speed * limits.dt)
        new_p, boxed = _box(p + dp, limits)
        dr, rcapped = _cap_norm(actions[k, 3:6] * rot_scale,
                                limits.max_angular_speed * limits.dt)
        count += int(capped or boxed or rcapped)
        out[k, :3] = (new_p - p) / pos_scale
        out[k, 3:6] = dr / rot_scale
        p, q = new_p, quat_mul(quat_from_rotvec(dr), q)
        pos[k], quat[k] = p, q
    return pos, quat, out, count


def limit_pose_targets(positions: np.ndarray, quats: np.ndarray, p0: np.ndarray,
                       q0: np.ndarray, limits: Limits):
    """Apply speed caps and the workspace box to absolute pose targets, from (p0, q0).

    Returns:
        positions (n, 3), quaternions (n, 4), steps limited.
    """
    out_p, out_q = positions.copy(), quats.copy()
    p, q, count = np.asarray(p0, float), np.asarray(q0, float), 0
    for k in range(len(positions)):
        dp, capped = _cap_norm(positions[k] - p, limits.max_linear_speed * limits.dt)
        new_p, boxed = _box(p + dp, limits)
        dr, rcapped = _cap_norm(rotvec_from_quat(quat_mul(quats[k], quat_conj(q))),
                                limits.max_angular_speed * limits.dt)
        count += int(capped or boxed or rcapped)
        p, q = new_p, quat_mul(quat_from_rotvec(dr), q)
        out_p[k], out_q[k] = p, q
    return out_p, out_q, count


def limit_joint_targets(joints: np.ndarray, j0: Optional[np.ndarray], limits: Limits):
    """Cap each joint's change per step at ``max_joint_speed * dt`` from ``j0``.

    Returns:
        joints (n, J), steps limited.
    """
    cap = limits.max_joint_speed * limits.dt
    if cap <= 0 or j0 is None:
        return joints, 0
    out, prev, count = joints.copy(), np.asarray(j0, float), 0
    for k in range(len(out)):
        step = np.clip(out[k] - prev, -cap, cap)
        count += int(not np.allclose(step, out[k] - prev))
        out[k] = prev + step
        prev = out[k]
    return out, count


def first_pending_step(stamp_ns: int, dt_ns: int, now_ns: int, n: int) -> int:
    """Index of the first absolute target of a chunk that is still ahead of ``now_ns``.

    Target k is for ``stamp + k * dt``; targets at or before now have elapsed and are
    skipped (the robot is past them), so ``n`` means the whole chunk is late.
    """
    if now_ns < stamp_ns:
        return 0
    return min(n, (now_ns - stamp_ns) // dt_ns + 1)
