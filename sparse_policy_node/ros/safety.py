"""The safety layer: the last step of every action before it leaves the policy node.

Pure numpy (no rclpy). The node's output paths (``~/next_action``, ``~/action_chunk``,
``~/target_pose``, ``~/joint_trajectory``, ``~/gripper_command``; chunks, ticks, holds and
the stop at deactivation) all pass their values through one :class:`SafetyLayer`, which
applies the limits last and measures them from the last value actually sent on that output
(per tick, across chunks, after blending):

- ``bounds``: per action dimension (from the model card for absolute action spaces,
  ``action.lower`` / ``action.upper`` for robosuite deltas), see :func:`action_bounds`;
- ``max_step_change``: consecutive sent actions differ by at most this per dimension;
- ``max_linear_speed`` / ``max_angular_speed``: a pose target moves at most ``v * dt`` from
  the last target sent; ``workspace_min`` / ``workspace_max``: targets stay in the box;
- ``max_joint_speed``: a joint target moves at most ``v * (t - t_ref)`` from the target in
  force at ``t_ref`` (the last one sent, else the measured joints: no reference is a hold);
- the enable input with a deadman timeout (:class:`Deadman`) and the watchdog
  (:meth:`SafetyLayer.hold`), which decide whether anything is commanded at all.

Shapes: actions (A,) or (n, A); positions (3,); quaternions (4,) as (x, y, z, w); joints (J,)
or (n, J); times in ns.
"""

from dataclasses import dataclass
from dataclasses import field
from typing import Dict
from typing import NamedTuple
from typing import Optional
from typing import Tuple

import numpy as np
from sparse_policy_node.ros import actions as act

HOLD_OUTPUTS = ('hold', 'silent')
ABSOLUTE_SPACES = ('abs_eef_pose', 'joint_pos')


def _move(prev: np.ndarray, value: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Return ``value``, or ``prev`` moved towards it by at most ``limit`` per dimension.

    Dimensions within the limit keep ``value`` exactly (no rounding through ``prev``).
    """
    d = value - prev
    c = np.clip(d, -limit, limit)
    return np.where(c == d, value, prev + c)


class SafetyConfigError(ValueError):
    """A safety setting that contradicts the model (e.g. a limit outside the card's)."""


def _vec(values, n: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=float).reshape(-1)
    if len(v) == 1:
        return np.full(n, float(v[0]))
    if len(v) != n:
        raise SafetyConfigError(f'{name} needs 1 or {n} values, got {len(v)}')
    return v.copy()


Pair = Tuple[np.ndarray, np.ndarray]


def card_range(card: Optional[dict], action_dim: int) -> Optional[Pair]:
    """Return the card's ``action.range`` as (lower (A,), upper (A,)), None without one.

    ``range`` is ``[lo, hi]`` (every dimension) or ``[[lo_0..lo_A-1], [hi_0..hi_A-1]]``.
    """
    rng = ((card or {}).get('action') or {}).get('range')
    if rng is None:
        return None
    try:
        lo, hi = rng
        lo, hi = _vec(lo, action_dim, 'action.range'), _vec(hi, action_dim, 'action.range')
    except (TypeError, ValueError) as exc:
        raise SafetyConfigError(f'model card action.range {rng!r} is not [lower, upper] with '
                                f'1 or {action_dim} values each: {exc}') from exc
    if not np.all(lo < hi):
        raise SafetyConfigError(f'model card action.range has lower >= upper: {rng!r}')
    return lo, hi


def action_bounds(space: Optional[str], card: Optional[dict], lower, upper, explicit: bool,
                  action_dim: int) -> Tuple[np.ndarray, np.ndarray, str]:
    """Return the per-dimension action bounds (A,), (A,) and where they come from.

    - no card, or a ``delta_eef`` card: ``action.lower`` / ``action.upper`` as configured
      (robosuite's normalized deltas, ±1 by default);
    - an absolute space (``abs_eef_pose``, ``joint_pos``): the card's ``action.range`` (no
      range: unbounded), never the ±1 default. A configured ``action.lower`` / ``upper``
      (``explicit``) narrows it and must lie inside the card's range.

    Raises:
        SafetyConfigError: a configured limit outside the card's range, or a malformed range.
    """
    lo = _vec(lower, action_dim, 'action.lower')
    hi = _vec(upper, action_dim, 'action.upper')
    if space not in ABSOLUTE_SPACES:
        return lo, hi, 'action.lower/upper'
    rng = card_range(card, action_dim)
    if not explicit:
        if rng is None:
            unbounded = np.full(action_dim, np.inf)
            return -unbounded, unbounded, 'none (the card has no action.range)'
        return rng[0], rng[1], 'model card action.range'
    if rng is not None:
        bad = [i for i in range(action_dim) if lo[i] < rng[0][i] or hi[i] > rng[1][i]]
        if bad:
            raise SafetyConfigError(
                f'action.lower/upper ({lo.tolist()} / {hi.tolist()}) contradict the model '
                f'card: dimensions {bad} reach outside its action.range ({rng[0].tolist()} / '
                f'{rng[1].tolist()})')
    return lo, hi, 'action.lower/upper (configured)'


def model_bounds(card: Optional[dict], lower, upper,
                 action_dim: int) -> Tuple[np.ndarray, np.ndarray, str]:
    """:func:`action_bounds` for a model card and the ``action.lower`` / ``upper`` settings.

    The +-1 default of the settings counts as not set, also when a parameter file repeats it
    (config/policy.yaml does): an absolute model then takes its card's range.
    """
    explicit = (tuple(lower), tuple(upper)) != ((-1.0,), (1.0,))
    space = ((card or {}).get('action') or {}).get('space')
    return action_bounds(space, card, lower, upper, explicit, action_dim)


@dataclass
class SafetyConfig:
    """Every limit the layer applies; built from the node settings, replaced live."""

    dt_ns: int
    lower: np.ndarray                       # (A,) action bounds (may be +-inf)
    upper: np.ndarray                       # (A,)
    max_step_change: np.ndarray             # (A,) 0: off
    max_linear_speed: float = 0.0           # m/s, 0: off
    max_angular_speed: float = 0.0          # rad/s, 0: off
    max_joint_speed: float = 0.0            # rad/s, 0: off
    workspace_min: Optional[np.ndarray] = None   # (3,)
    workspace_max: Optional[np.ndarray] = None   # (3,)
    enable_timeout_s: float = 0.0           # 0: the enable input is latched
    watchdog_s: float = 0.0                 # 0: off
    hold_output: str = 'hold'
    measured_max_age_s: float = 0.5         # a measured pose older than this is no hold
    bounds_source: str = ''

    def limits(self) -> act.Limits:
        """Return the :class:`actions.Limits` of the planning helpers (same values)."""
        return act.Limits(dt=self.dt_ns / 1e9, max_step_change=self.max_step_change,
                          max_linear_speed=self.max_linear_speed,
                          max_angular_speed=self.max_angular_speed,
                          max_joint_speed=self.max_joint_speed,
                          workspace_min=self.workspace_min, workspace_max=self.workspace_max)

    def unlimited(self) -> bool:
        """Return True when no motion limit is set (bounds aside)."""
        box = self.workspace_min is not None and (np.min(self.workspace_min) > -1000.0 or
                                                  np.max(self.workspace_max) < 1000.0)
        return not (np.any(self.max_step_change > 0) or self.max_linear_speed > 0 or
                    self.max_angular_speed > 0 or self.max_joint_speed > 0 or box)


def config_from_settings(s, dt_ns: int, action_dim: int, bounds: tuple) -> SafetyConfig:
    """Build a :class:`SafetyConfig` from NodeSettings ``s`` and resolved ``bounds``."""
    if s.safety_hold_output not in HOLD_OUTPUTS:
        raise SafetyConfigError(f'safety.hold_output must be one of {HOLD_OUTPUTS}, got '
                                f'{s.safety_hold_output!r}')
    return SafetyConfig(
        dt_ns=int(dt_ns), lower=bounds[0], upper=bounds[1], bounds_source=bounds[2],
        max_step_change=_vec(s.safety_max_step_change, action_dim, 'safety.max_step_change'),
        max_linear_speed=float(s.safety_max_linear_speed),
        max_angular_speed=float(s.safety_max_angular_speed),
        max_joint_speed=float(s.safety_max_joint_speed),
        workspace_min=np.asarray(s.safety_workspace_min, float),
        workspace_max=np.asarray(s.safety_workspace_max, float),
        enable_timeout_s=float(s.safety_enable_timeout_s),
        watchdog_s=float(s.safety_watchdog_s), hold_output=s.safety_hold_output,
        measured_max_age_s=max(float(s.max_obs_age_s), 2 * dt_ns / 1e9))


class Deadman:
    """The enable input: on while the last ``true`` is younger than the timeout.

    ``timeout_s`` 0 keeps the latched behaviour (the last Bool counts until the next one).
    :meth:`clear` (deactivate, reset) switches it off until the next ``true``.
    """

    def __init__(self, required: bool):
        self.required = required
        self._on = not required
        self._since_ns: Optional[int] = None     # time of the last true

    def receive(self, on: bool, now_ns: int) -> None:
        """Take one enable message received at ``now_ns``."""
        self._on = bool(on) or not self.required
        self._since_ns = now_ns if on else None

    def clear(self) -> None:
        """Switch off until the next ``true`` (no effect when enable is not required)."""
        self._on = not self.required
        self._since_ns = None

    def reason(self, now_ns: int, timeout_s: float) -> str:
        """Return why the input does not enable now ('' when enabled)."""
        if not self.required:
            return ''
        if not self._on:
            return 'enable input is off'
        if timeout_s > 0 and self._since_ns is not None and \
                now_ns - self._since_ns > timeout_s * 1e9:
            return (f'enable input expired: no true for {(now_ns - self._since_ns) / 1e9:.2f} s'
                    f' (> safety.enable_timeout_s={timeout_s})')
        return ''


@dataclass
class Sent:
    """What went out last on each output (the references of the limits)."""

    action: Optional[np.ndarray] = None              # (A,) ~/next_action
    pose: Optional[Tuple[np.ndarray, np.ndarray]] = None   # ~/target_pose (p (3,), q (4,))
    joints: Optional[Tuple[np.ndarray, np.ndarray]] = None  # (times (n,), targets (n, J))
    gripper: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)


class Hold(NamedTuple):
    """Why the node holds (:meth:`SafetyLayer.hold`).

    ``blocking``: no chunk can end it (the enable input, stale inputs); the watchdog's
    "no action" is not blocking, since the chunk in flight ends it.
    """

    reason: str
    blocking: bool


class SafetyLayer:
    """Limits, enable and watchdog; the one place an action passes on its way out.

    Not thread-safe: the node calls it under its lock. ``config`` may be replaced at any
    time (:meth:`update`); the next value filtered uses it.
    """

    def __init__(self, config: SafetyConfig, require_enable: bool):
        self.config = config
        self.deadman = Deadman(require_enable)
        self.sent = Sent()
        self.limited = 0            # values changed by a limit since start

    def update(self, config: SafetyConfig) -> None:
        """Use new limits from the next value filtered on."""
        self.config = config

    def forget(self) -> None:
        """Forget what was sent (reset, new episode, after a silent hold)."""
        self.sent = Sent()

    # ==== whether to command at all ====

    def hold(self, now_ns: int, input_ages: Dict[str, float],
             last_covered_ns: Optional[int]) -> Optional[Hold]:
        """Return why the node must hold now (None to command): enable, then the watchdog.

        Args:
            input_ages: seconds since each input's newest message.
            last_covered_ns: the last time an action covered a control tick (or activation).
        """
        c = self.config
        why = self.deadman.reason(now_ns, c.enable_timeout_s)
        if why:
            return Hold(why, blocking=True)
        if c.watchdog_s <= 0:
            return None
        if input_ages and max(input_ages.values()) > c.watchdog_s:
            key = max(input_ages, key=input_ages.get)
            return Hold(f'watchdog: input {key} is {input_ages[key]:.2f} s old '
                        f'(> {c.watchdog_s} s)', blocking=True)
        if last_covered_ns is not None and now_ns - last_covered_ns > c.watchdog_s * 1e9:
            return Hold(f'watchdog: no action for {(now_ns - last_covered_ns) / 1e9:.2f} s '
                        f'(> {c.watchdog_s} s)', blocking=False)
        return None

    # ==== vectors: ~/next_action, ~/action_chunk, the gripper ====

    def _bound(self, values: np.ndarray) -> np.ndarray:
        return np.clip(values, self.config.lower, self.config.upper)

    def action(self, values: np.ndarray, hold: bool = False) -> np.ndarray:
        """Limit one (A,) action against the last one sent; record it as sent.

        A hold value is bounded but not step-limited (a hold is a stop).
        """
        out = self._bound(np.asarray(values, float))
        prev = self.sent.action
        if not hold and prev is not None:
            out = self._step(out, prev)
        self._count(values, out)
        self.sent.action = out
        return out

    def chunk(self, values: np.ndarray, previous: Optional[np.ndarray]) -> np.ndarray:
        """Bound an (n, A) chunk and limit its step changes from ``previous`` (A,) or None."""
        out = self._bound(np.asarray(values, float))
        prev = previous
        for k in range(len(out)):
            if prev is not None:
                out[k] = self._step(out[k], prev)
            prev = out[k]
        self._count(values, out)
        return out

    def _step(self, value: np.ndarray, prev: np.ndarray) -> np.ndarray:
        m = np.where(self.config.max_step_change > 0, self.config.max_step_change, np.inf)
        return _move(prev, value, m)

    def _count(self, before, after) -> None:
        before = np.asarray(before, float)
        if before.shape == after.shape:
            rows = before.reshape(-1, after.shape[-1]) if after.ndim else before.reshape(1, -1)
            rows_after = after.reshape(rows.shape)
            self.limited += int(np.sum(~np.all(np.isclose(rows, rows_after), axis=-1)))

    def gripper(self, value: float, index: int) -> float:
        """Bound a gripper command by its action dimension's bounds; record it as sent."""
        v = float(np.clip(value, self.config.lower[index], self.config.upper[index]))
        self.sent.gripper = v
        return v

    # ==== chunk plans: the limits along a chunk before it is published ====
    # (The per-tick methods below apply the limits again, last, from what was sent.)

    def plan_deltas(self, actions: np.ndarray, p0: np.ndarray, q0: np.ndarray,
                    pos_scale: float, rot_scale: float):
        """Integrate (n, A) end-effector deltas from the measured (p0, q0) into limited targets.

        Returns:
            positions (n, 3), quaternions (n, 4), the limited deltas (n, A), steps limited.
        """
        return act.integrate_deltas(actions, p0, q0, pos_scale, rot_scale,
                                    self.config.limits())

    def plan_pose_targets(self, positions: np.ndarray, quats: np.ndarray, start: Pair):
        """Limit (n, 3) / (n, 4) absolute pose targets along the chunk from ``start``.

        Returns:
            positions (n, 3), quaternions (n, 4), steps limited.
        """
        return act.limit_pose_targets(positions, quats, start[0], start[1],
                                      self.config.limits())

    def plan_joints(self, joints: np.ndarray, start: Optional[np.ndarray]):
        """Cap (n, J) joint targets at ``max_joint_speed * dt`` per step from ``start``.

        Returns:
            joints (n, J), steps limited.
        """
        return act.limit_joint_targets(joints, start, self.config.limits())

    # ==== pose targets ====

    def pose(self, p: np.ndarray, q: np.ndarray, reference=None) -> Pair:
        """Limit a pose target: speed caps from the last target sent (else ``reference``).

        Returns the limited (p (3,), q (4,)), recorded as sent.
        """
        c = self.config
        ref = self.sent.pose if self.sent.pose is not None else reference
        p, q = np.asarray(p, float), np.asarray(q, float)
        lim = c.limits()
        limited = False
        if ref is not None:
            dp = p - ref[0]
            cap = c.max_linear_speed * lim.dt
            n = float(np.linalg.norm(dp))
            if cap > 0 and n > cap:
                p, limited = ref[0] + dp * (cap / n), True
            rot = act.rotvec_from_quat(act.quat_mul(q, act.quat_conj(ref[1])))
            cap, angle = c.max_angular_speed * lim.dt, float(np.linalg.norm(rot))
            if cap > 0 and angle > cap:
                q, limited = act.quat_mul(act.quat_from_rotvec(rot * (cap / angle)), ref[1]), True
        boxed = act.clamp_to_box(p, lim)
        limited = limited or not np.allclose(boxed, p)
        self.limited += int(limited)
        self.sent.pose = (boxed, q)
        return boxed, q

    # ==== joint trajectories ====

    def joints_in_force(self, now_ns: int) -> Optional[np.ndarray]:
        """Return the joint target in force at ``now_ns`` of the last trajectory sent."""
        if self.sent.joints is None:
            return None
        times, targets = self.sent.joints
        if now_ns <= times[0]:
            return targets[0].copy()
        if now_ns >= times[-1]:
            return targets[-1].copy()
        return np.array([np.interp(now_ns, times, targets[:, j])
                         for j in range(targets.shape[1])])

    def trajectory(self, times_ns: np.ndarray, targets: np.ndarray, now_ns: int,
                   measured: Optional[np.ndarray], index: slice) -> Optional[np.ndarray]:
        """Limit joint targets (n, J) at absolute ``times_ns`` (n,); record them as sent.

        The reference is the target in force now (last trajectory sent), else ``measured``;
        point i moves at most ``max_joint_speed * (t_i - t_{i-1})`` from the one before
        (``t_-1 = now``), and at most ``max_step_change`` per point. Bounds are the action
        bounds of the joint dimensions ``index``; the targets are bounded first and the caps
        win: from a reference outside the bounds the targets move back at the capped speed
        (never a jump).

        Returns:
            the limited (n, J) targets, or None when there is no reference (no target sent,
            no joint state): the caller holds.
        """
        c = self.config
        ref = self.joints_in_force(now_ns)
        if ref is None:
            ref = measured
        if ref is None:
            return None
        lo, hi = c.lower[index], c.upper[index]
        step = c.max_step_change[index]
        step = np.where(step > 0, step, np.inf)
        out = np.clip(np.asarray(targets, float), lo, hi)
        prev, t_prev = np.asarray(ref, float), now_ns
        for i in range(len(out)):
            cap = c.max_joint_speed * max(0, int(times_ns[i]) - t_prev) / 1e9 \
                if c.max_joint_speed > 0 else np.inf
            m = np.minimum(step, cap)
            out[i] = _move(prev, out[i], m)
            prev, t_prev = out[i], int(times_ns[i])
        self._count(targets, out)
        self.sent.joints = (np.asarray(times_ns, dtype=np.int64), out.copy())
        return out

    def joint_stop(self, now_ns: int, measured: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """Return the (J,) point to stop at: the target in force now, else ``measured``.

        Recorded as sent (a one-point trajectory at ``now + dt``), so that a later
        trajectory continues from it.
        """
        target = self.joints_in_force(now_ns)
        if target is None and measured is not None:
            target = np.asarray(measured, float)
        if target is not None:
            self.sent.joints = (np.array([now_ns], dtype=np.int64), target[None].copy())
        return target
