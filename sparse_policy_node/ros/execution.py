"""Chunk execution: which action each control tick sends, and how overlapping chunks combine.

Pure numpy (no rclpy), shared by the policy node and the bridge's real-time mode.

Two kinds of actions, executed differently::

    absolute (abs_eef_pose, joint_pos, deltas integrated into pose targets)
      chunk   |s  |s+1|s+2|s+3|s+4|s+5|          target i is for time s + i * dt
      arrives           ^ now = s + 2.4 dt
      sent              |s+2|s+3|s+4|s+5|        elapsed targets skipped: the robot is
                                                 past them, and a later target is absolute
    delta (delta_eef, and chunks without a model card: robosuite's deltas)
      sent before s: e deltas          new delta i is execution step e + i
      sent since s : |o  |o  |         (from the previous chunk: they ran, not again)
      sent next    :         |d2 |d3 |d4 |...    every delta once, in order, one per tick;
                                                 none dropped, even when the chunk is late

A delta's place is counted in *executed steps*, not in time: ``e`` is how many deltas had
been sent before the observation the chunk was computed from (ticks earlier than its stamp;
the bridge counts exactly). After an underrun (no action for some ticks) the queue runs
late rather than skipping motion; the next chunk aligns to what had run when its
observation was taken, so the lag never grows beyond one inference.

Absolute targets are picked per tick by time, with hysteresis: each tick takes the target
after the previous one, and re-aligns to the nearest target only when that is more than
``HYSTERESIS`` steps off (a missed tick, a clock jump). A tick phase near half a period
therefore neither repeats nor skips targets, as rounding ``(now - stamp) / dt`` did.

How a new chunk combines with the previous ones (``execution.mode``):

- ``replace``: the new chunk replaces the rest of the old one.
- ``blend`` (real-time-chunking style, without inpainting): steps that ran or elapsed before
  the chunk arrived are never sent from it (RTC's frozen prefix: what ran was the old
  chunk's); the next ``blend_steps`` pending steps go from the old chunk to the new one with
  old weights ``(N - j) / (N + 1)``, j = 0..N-1 counted from the first pending step. Works
  for both kinds.

- ``rtc`` (real-time chunking, :mod:`sparse_policy_node.core.rtc`): the new chunk was
  sampled with the current chunk's values over their overlap inpainted (:meth:`committed`
  gives them: the first ``d`` pinned, the rest with soft weights), so its pending steps
  already agree with what runs; they replace the old ones as in ``replace``.

- ``ensemble`` (ACT temporal ensembling): each step is the weighted mean of every stored
  chunk that predicts it, weight ``exp(-decay * age)`` with ``age`` the chunk's stamp in
  steps after the oldest contributing chunk (decay > 0 favours older predictions, as ACT).
  Absolute actions only: averaging deltas of chunks computed from different poses has no
  meaning, so a delta model is refused unless its deltas are integrated into pose targets.

The combined chunk keeps the new chunk's own values before the first pending step, so a
consumer that executes whole chunks from their stamp (the lockstep bridge) gets what the
model predicted for them. A chunk's first pending delta is sent on arrival when no delta
went out in the last half period, so a late chunk does not wait for the next tick either.
"""

from collections import deque
from dataclasses import dataclass
import math
from typing import Dict
from typing import List
from typing import Optional
from typing import Tuple

import numpy as np

ABSOLUTE, DELTA = 'absolute', 'delta'
MODES = ('replace', 'blend', 'ensemble', 'rtc')
HYSTERESIS = 0.75   # steps: re-align absolute targets when a tick is further off than this


def action_kind(space: Optional[str], delta_reference: str, output_mode: str) -> str:
    """Return how a model's actions are executed: ``absolute`` or ``delta``.

    Deltas relative to the previous target (``integrated``) become absolute pose targets in
    ``pose_target`` output; deltas relative to the measured pose, deltas on chunk output
    and chunks without a model card (robosuite's deltas) stay deltas.
    """
    if space in ('abs_eef_pose', 'joint_pos'):
        return ABSOLUTE
    if space == 'delta_eef' and output_mode == 'pose_target' and \
            delta_reference == 'integrated':
        return ABSOLUTE
    return DELTA


def check_mode(mode: str, kind: str, blend_steps: int, decay: float) -> None:
    """Raise ValueError naming the parameter when a mode does not fit the actions."""
    if mode not in MODES:
        raise ValueError(f'execution.mode must be one of {MODES}, got {mode!r}')
    if blend_steps < 0:
        raise ValueError(f'execution.blend_steps must be >= 0, got {blend_steps}')
    if mode == 'blend' and blend_steps < 1:
        raise ValueError('execution.mode blend needs execution.blend_steps >= 1')
    if mode != 'blend' and blend_steps:
        raise ValueError(f'execution.blend_steps={blend_steps} only applies to '
                         f'execution.mode blend (mode is {mode!r}); set it to 0 or the mode '
                         f'to blend')
    if not (math.isfinite(decay) and 0.0 <= decay <= 10.0):
        raise ValueError(f'execution.ensemble_decay must be in [0, 10], got {decay}')
    if mode == 'ensemble' and kind == DELTA:
        raise ValueError("execution.mode ensemble averages absolute targets; this model's "
                         'actions are deltas (relative to the measured pose, or on chunk '
                         'output): use blend or replace, or a delta_eef model with '
                         'delta_reference integrated in output.mode pose_target')


# ==== combining chunks (pure functions) ====

def _align_quat(q: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return -q if float(np.dot(q, ref)) < 0 else q


def normalize_quats(values: np.ndarray, quat_at: Optional[int]) -> np.ndarray:
    """Renormalize the (x, y, z, w) quaternion at columns ``quat_at:quat_at + 4``."""
    if quat_at is not None:
        q = values[:, quat_at:quat_at + 4]
        values[:, quat_at:quat_at + 4] = q / np.linalg.norm(q, axis=1, keepdims=True)
    return values


def value_at(stamp_ns: int, values: np.ndarray, dt_ns: int, t_ns: int,
             quat_at: Optional[int] = None) -> Optional[np.ndarray]:
    """Return a chunk's value at time ``t_ns`` (linear between its steps), None outside it.

    Args:
        values: (n, D) absolute values, step i for ``stamp_ns + i * dt_ns``.
    """
    x = (t_ns - stamp_ns) / dt_ns
    n = len(values)
    if x < -1e-6 or x > n - 1 + 1e-6:
        return None
    j = min(max(int(math.floor(x + 1e-6)), 0), n - 1)
    frac = min(max(x - j, 0.0), 1.0)
    if frac < 1e-6 or j == n - 1:
        return values[j].copy()
    a, b = values[j].copy(), values[j + 1].copy()
    if quat_at is not None:
        b[quat_at:quat_at + 4] = _align_quat(b[quat_at:quat_at + 4], a[quat_at:quat_at + 4])
    out = (1 - frac) * a + frac * b
    return normalize_quats(out[None], quat_at)[0]


def blend_weights(n: int, first_pending: int, steps: int) -> np.ndarray:
    """Weight of the old chunk per step of a new one (0 before the first pending step)."""
    w = np.zeros(n)
    for j in range(steps):
        i = first_pending + j
        if 0 <= i < n:
            w[i] = (steps - j) / (steps + 1)
    return w


def mix(old: Optional[np.ndarray], new: np.ndarray, w_old: float,
        quat_at: Optional[int]) -> np.ndarray:
    """Return ``w_old * old + (1 - w_old) * new`` (new where there is no old value)."""
    if old is None or w_old <= 0:
        return new.copy()
    if quat_at is not None:
        old = old.copy()
        old[quat_at:quat_at + 4] = _align_quat(old[quat_at:quat_at + 4],
                                               new[quat_at:quat_at + 4])
    out = w_old * old + (1 - w_old) * new
    return normalize_quats(out[None], quat_at)[0]


def ensemble(chunks, dt_ns: int, t_ns: int, decay: float,
             quat_at: Optional[int] = None) -> Optional[np.ndarray]:
    """Return the ACT-weighted mean of every chunk's value at ``t_ns`` (None: no chunk).

    Args:
        chunks: (stamp_ns, (n, D) values) pairs; a chunk stamped ``age`` steps after the
            oldest one predicting ``t_ns`` weighs ``exp(-decay * age)``.
    """
    found = [(s, v) for s, v in ((s, value_at(s, vals, dt_ns, t_ns, quat_at))
                                 for s, vals in chunks) if v is not None]
    if not found:
        return None
    oldest = min(s for s, _ in found)
    ref = found[-1][1]
    total, acc = 0.0, np.zeros_like(ref)
    for s, v in found:
        w = math.exp(-decay * (s - oldest) / dt_ns)
        if quat_at is not None:
            v = v.copy()
            v[quat_at:quat_at + 4] = _align_quat(v[quat_at:quat_at + 4],
                                                 ref[quat_at:quat_at + 4])
        acc += w * v
        total += w
    return normalize_quats((acc / total)[None], quat_at)[0]


# ==== the executor ====

@dataclass
class Planned:
    """A chunk combined with the previous ones, ready to :meth:`ChunkExecutor.commit`."""

    stamp_ns: int
    base: int                 # delta kind: execution step of values[0]
    values: np.ndarray        # (n, D) effective values
    first_pending: int        # first step that will still be sent
    raw: list                 # ensemble: the raw chunks kept after the commit


class ChunkExecutor:
    """Execution state of one action stream: chunks in, one action per control tick out.

    Not thread-safe: the node calls it under its lock. ``values`` are (n, D) arrays; for
    ``quat_at`` columns ``quat_at:quat_at + 4`` hold a quaternion (pose targets), averaged
    with sign alignment and renormalized.
    """

    def __init__(self, kind: str, dt_ns: int, mode: str = 'replace', blend_steps: int = 0,
                 decay: float = 0.01, quat_at: Optional[int] = None):
        check_mode(mode, kind, blend_steps, decay)
        self.kind, self.dt_ns, self.mode = kind, int(dt_ns), mode
        self.blend_steps, self.decay, self.quat_at = blend_steps, decay, quat_at
        self.sent = 0                      # deltas sent since start (execution steps)
        self._sent_at = deque(maxlen=4096)  # tick time of each delta sent since the last drop
        self.drop()

    def drop(self) -> None:
        """Forget the chunks and when deltas were sent (hold, disable, reset).

        The next chunk starts at its first delta: after a hold nothing of an old chunk runs
        on, and after a reset the clock may have jumped back behind old send times.
        """
        self._sent_at.clear()
        self.current = None    # (stamp_ns, base, (n, D) effective values)
        self._raw = []         # (stamp_ns, (n, D) values) kept for ensembling
        self._last_k = None    # absolute: index of the last target sent in current
        self._last_t = None    # absolute: time of the last target sent

    def sent_before(self, stamp_ns: int) -> int:
        """Return how many deltas had been sent at ticks earlier than ``stamp_ns``."""
        later = 0
        for t in reversed(self._sent_at):
            if t < stamp_ns:
                break
            later += 1
        return self.sent - later

    def first_pending(self, stamp_ns: int, n: int, now_ns: int,
                      base: Optional[int] = None) -> int:
        """Index of a new chunk's first step that will still be sent (``n``: none)."""
        if self.kind == DELTA:
            base = self.sent_before(stamp_ns) if base is None else base
            return min(n, max(0, self.sent - base))
        return min(n, max(0, round((now_ns - stamp_ns) / self.dt_ns)))

    def plan(self, stamp_ns: int, values: np.ndarray, now_ns: int,
             base: Optional[int] = None) -> 'Planned':
        """Combine a new chunk with the previous ones, without changing any state.

        Args:
            values: (n, D) the chunk's actions or targets, step 0 for ``stamp_ns``.
            base: delta kind: deltas sent before the chunk's observation, when the caller
                knows it exactly; else counted from the tick times.

        Returns:
            the :class:`Planned` chunk to :meth:`commit`: its (n, D) effective values
            (combined as the mode says from the first pending step on) and that step.
        """
        values = np.asarray(values, dtype=float)
        n = len(values)
        if self.kind == DELTA:
            base = self.sent_before(stamp_ns) if base is None else int(base)
        else:
            base = 0
        p = self.first_pending(stamp_ns, n, now_ns, base)
        out, raw = values.copy(), []
        if self.mode == 'ensemble':
            raw = [(s, v) for s, v in self._raw
                   if s + (len(v) - 1) * self.dt_ns >= now_ns - self.dt_ns]
            raw.append((stamp_ns, values))
            for i in range(p, n):
                out[i] = ensemble(raw, self.dt_ns, stamp_ns + i * self.dt_ns, self.decay,
                                  self.quat_at)
        else:
            steps = self.blend_steps if self.mode == 'blend' else 0
            w = blend_weights(n, p, steps)
            for i in range(n):
                if w[i] > 0:
                    out[i] = mix(self._old_value(stamp_ns, base, i), values[i], w[i],
                                 self.quat_at)
        return Planned(stamp_ns, base, out, p, raw)

    def commit(self, planned: 'Planned') -> None:
        """Make a planned chunk the one the ticks execute."""
        self.current = (planned.stamp_ns, planned.base, planned.values)
        self._raw = planned.raw

    def add(self, stamp_ns: int, values: np.ndarray, now_ns: int,
            base: Optional[int] = None) -> Tuple[np.ndarray, int]:
        """Plan and commit a chunk; return its effective values and first pending step."""
        planned = self.plan(stamp_ns, values, now_ns, base)
        self.commit(planned)
        return planned.values, planned.first_pending

    def committed(self, stamp_ns: int, base: Optional[int] = None) -> Optional[np.ndarray]:
        """Return the current chunk's values for a new chunk's steps 0, 1, ... (rtc prefix).

        Args:
            stamp_ns: the new chunk's observation time (its step 0).
            base: delta kind: deltas sent before that observation (as :meth:`plan`).

        Returns:
            (m, D) values of the steps the current chunk covers from the new chunk's step 0
            on (m = the overlap), or None without a current chunk or overlap.
        """
        if self.current is None:
            return None
        if self.kind == DELTA:
            base = self.sent_before(stamp_ns) if base is None else int(base)
        else:
            base = 0
        rows = []
        for i in range(len(self.current[2])):
            v = self._old_value(stamp_ns, base, i)
            if v is None:
                break
            rows.append(v)
        return np.stack(rows) if rows else None

    def _old_value(self, stamp_ns: int, base: int, i: int) -> Optional[np.ndarray]:
        if self.current is None:
            return None
        old_stamp, old_base, old = self.current
        if self.kind == DELTA:
            j = base + i - old_base
            return old[j] if 0 <= j < len(old) else None
        return value_at(old_stamp, old, self.dt_ns, stamp_ns + i * self.dt_ns, self.quat_at)

    def covers(self, now_ns: int) -> bool:
        """Return True when the current chunk has an action for a tick at ``now_ns``."""
        if self.current is None:
            return False
        if self.kind == DELTA:
            return 0 <= self.sent - self.current[1] < len(self.current[2])
        return self.peek(now_ns) is not None

    def peek(self, now_ns: int) -> Optional[int]:
        """Index of the current chunk's absolute target for ``now_ns``, without sending."""
        if self.current is None or self.kind == DELTA:
            return None
        k = round((now_ns - self.current[0]) / self.dt_ns)
        return k if 0 <= k < len(self.current[2]) else None

    def tick(self, now_ns: int) -> Optional[Tuple[int, int]]:
        """Advance one control tick; return (step index, the step's time) or None (no action).

        Delta: the next unsent execution step of the current chunk (counted as sent), unless
        one went out less than half a period ago (a chunk's first delta is sent on arrival).
        Absolute: the target after the previous tick's, or the nearest one when that is
        more than ``HYSTERESIS`` steps off ``now_ns``; None past the chunk's end.
        """
        if self.current is None:
            return None
        stamp, base, values = self.current
        n = len(values)
        if self.kind == DELTA:
            k = self.sent - base
            if not 0 <= k < n:
                return None
            if self._sent_at and 0 <= now_ns - self._sent_at[-1] < self.dt_ns // 2:
                return None  # sent at arrival in this period already: one per period
            self.sent += 1
            self._sent_at.append(now_ns)
            return k, stamp + k * self.dt_ns
        x = (now_ns - stamp) / self.dt_ns
        k = round(x)
        if self._last_t is not None:
            follow = round((self._last_t + self.dt_ns - stamp) / self.dt_ns)
            if abs(x - follow) <= HYSTERESIS:
                k = follow
        if not 0 <= k < n:
            return None
        self._last_k, self._last_t = k, stamp + k * self.dt_ns
        return k, self._last_t

    def remaining(self) -> int:
        """Return the steps not sent yet (delta) or after the last one sent (absolute)."""
        if self.current is None:
            return 0
        stamp, base, values = self.current
        if self.kind == DELTA:
            return max(0, base + len(values) - self.sent)
        last = -1 if self._last_t is None else round((self._last_t - stamp) / self.dt_ns)
        return max(0, len(values) - 1 - last)


# ==== real-time chunking: the delay d from measurement ====

class DelayEstimator:
    """The rtc delay ``d`` in control steps, from measured observation-to-chunk latencies.

    ``d = clamp(ceil((percentile of the last latencies + exec_latency_s) / dt), floor, cap)``:
    a chunk's first ``d`` steps are what runs before it can act (inference, publishing, the
    actuation margin), so they are pinned to the executing chunk. Before the first
    measurement ``d`` is the floor.
    """

    def __init__(self, window: int = 100):
        self._latencies = deque(maxlen=window)  # seconds, newest last

    def add(self, latency_s: float) -> None:
        """Record one chunk's latency: its observation stamp to its publication (s)."""
        if math.isfinite(latency_s) and latency_s >= 0:
            self._latencies.append(float(latency_s))

    def reset(self) -> None:
        """Forget the measurements (a new model or device: a different latency)."""
        self._latencies.clear()

    def latency_s(self, percentile: float) -> Optional[float]:
        """Return the ``percentile`` of the recorded latencies (s), None before the first."""
        if not self._latencies:
            return None
        return float(np.percentile(list(self._latencies), percentile))  # list: one C call

    def steps(self, dt_s: float, percentile: float, floor: int, cap: int,
              exec_latency_s: float = 0.0) -> int:
        """Return ``d`` in control steps of ``dt_s`` (see the class docstring)."""
        lat = self.latency_s(percentile)
        if lat is None:
            return floor
        d = int(math.ceil((lat + exec_latency_s) / dt_s - 1e-9))
        return min(max(d, floor), cap)


# ==== smoothness of what ran: chunk boundaries against within a chunk ====

ARM_DIMS = 6  # OSC pose deltas; the 7th dimension is the gripper command


def smoothness(actions: np.ndarray, source: List[int]) -> Dict[str, List[float]]:
    """Split first and second differences of executed actions into within / boundary.

    Args:
        actions: (T, A) executed actions.
        source: T ids of the chunk each action came from (-1: a hold).

    Returns:
        ``{'da_within', 'da_boundary', 'd2a_within', 'd2a_boundary'}``: lists of norms over
        the arm dimensions.
    """
    a = np.asarray(actions, dtype=float)[:, :ARM_DIMS]
    out = {'da_within': [], 'da_boundary': [], 'd2a_within': [], 'd2a_boundary': []}
    for t in range(1, len(a)):
        ids = source[t - 1:t + 1]
        if min(ids) >= 0:
            key = 'da_within' if ids[0] == ids[1] else 'da_boundary'
            out[key].append(float(np.linalg.norm(a[t] - a[t - 1])))
        if t >= 2:
            ids = source[t - 2:t + 1]
            if min(ids) >= 0:
                key = 'd2a_within' if len(set(ids)) == 1 else 'd2a_boundary'
                out[key].append(float(np.linalg.norm(a[t] - 2 * a[t - 1] + a[t - 2])))
    return out
