"""Timestamped observation history aligned to the policy rate (no ROS, unit-testable).

Each model key (camera image or low-dim vector) is a stream of ``(stamp, value, arrival)``
entries. A window is built at the newest stamp all streams have reached, ``t_ref``; step
``i`` of ``T_o`` takes, per stream, the entry nearest ``t_ref - (T_o - 1 - i) * dt`` within
the sync tolerance. Right after a reset a stream may be shorter than the window: missing
earlier steps repeat its first entry (what Diffusion Policy's multi-step wrapper does at an
episode start). A gap later in the episode is a sync failure, never padded.

Streams keep entries by time, not by count: everything within ``retention_ns`` of the
stream's newest stamp. A 1 kHz joint stream therefore still holds the entries a window
needs when a 30 Hz camera lags it by tens of milliseconds. Entries are looked up by
bisection on their (increasing) stamps.
"""

import bisect
from dataclasses import dataclass
import threading
import time
from typing import Dict
from typing import List
from typing import Optional
from typing import Sequence

import numpy as np

ACCEPTED = 'accepted'
OUT_OF_ORDER = 'out_of_order'
DUPLICATE = 'duplicate'
BEFORE_RESET = 'before_reset'
TIME_JUMP = 'time_jump'


@dataclass
class Window:
    """A synchronized observation window: per key a (T_o, ...) array, stamped at t_ref."""

    stamp_ns: int
    arrays: Dict[str, np.ndarray]
    newest_arrival: float   # time.monotonic() when its newest entry arrived
    stamps: Optional[Dict[str, List[int]]] = None   # per key, stamps of the T_o entries


class ObservationHistory:
    """Per-key bounded history of stamped observations; thread-safe."""

    def __init__(self, keys: Sequence[str], n_steps: int, dt_ns: int, tolerance_ns: int,
                 jump_ns: int, retention_ns: Optional[int] = None):
        self.keys = tuple(keys)
        self.n_steps, self.dt_ns = n_steps, dt_ns
        self.tolerance_ns, self.jump_ns = tolerance_ns, jump_ns
        # Long enough for a window (T_o steps) plus one second of lag between streams.
        self.retention_ns = retention_ns or (n_steps + 1) * dt_ns + 1_000_000_000
        self._lock = threading.Lock()
        self.clear(floor_ns=None)

    def clear(self, floor_ns: Optional[int] = None) -> None:
        """Forget everything (new episode).

        Args:
            floor_ns: entries stamped at or before this (or the newest stamp seen so far, if
                later) are late messages of the previous episode and get dropped; None
                disables the floor (time jumps, where new stamps are smaller).
        """
        with self._lock:
            if floor_ns is not None:
                floor_ns = max(floor_ns, getattr(self, '_newest_seen', None) or floor_ns)
            self._streams = {k: [] for k in self.keys}
            self._stamps = {k: [] for k in self.keys}   # the streams' stamps, for bisect
            self._first = dict.fromkeys(self.keys)     # first stamp since the reset
            self._floor = floor_ns
            self._newest_seen = None
            self._cleared_at = time.monotonic()

    def add(self, key: str, stamp_ns: int, value: np.ndarray,
            arrival: Optional[float] = None) -> str:
        """Append one entry; return ACCEPTED or why it was not (TIME_JUMP: caller resets)."""
        arrival = time.monotonic() if arrival is None else arrival
        with self._lock:
            stream = self._streams[key]
            if self._floor is not None and stamp_ns <= self._floor:
                if stamp_ns < self._floor - self.jump_ns:
                    return TIME_JUMP
                return BEFORE_RESET
            if stream:
                newest = stream[-1][0]
                if stamp_ns == newest:
                    return DUPLICATE
                if stamp_ns < newest:
                    return TIME_JUMP if stamp_ns < newest - self.jump_ns else OUT_OF_ORDER
            stream.append((stamp_ns, value, arrival))
            stamps = self._stamps[key]
            stamps.append(stamp_ns)
            if stamps[0] < stamp_ns - 2 * self.retention_ns:  # trim in batches (amortized)
                cut = bisect.bisect_left(stamps, stamp_ns - self.retention_ns)
                del stream[:cut], stamps[:cut]
            if self._first[key] is None:
                self._first[key] = stamp_ns
            if self._newest_seen is None or stamp_ns > self._newest_seen:
                self._newest_seen = stamp_ns
            return ACCEPTED

    def newest_stamps(self) -> Dict[str, Optional[int]]:
        """Newest stamp per key (None for an empty stream)."""
        with self._lock:
            return {k: (s[-1][0] if s else None) for k, s in self._streams.items()}

    def window(self) -> (Optional[Window], str):
        """Return the newest synchronized window, or (None, reason)."""
        with self._lock:
            empty = [k for k, s in self._streams.items() if not s]
            if empty:
                return None, f'waiting for {", ".join(empty)}'
            t_ref = min(s[-1][0] for s in self._streams.values())
            arrays, stamps, newest_arrival = {}, {}, 0.0
            for key, stream in self._streams.items():
                picked = []
                for i in range(self.n_steps):
                    target = t_ref - (self.n_steps - 1 - i) * self.dt_ns
                    entry = self._nearest(stream, self._stamps[key], target)
                    if entry is None and target < self._first[key]:
                        entry = stream[0]  # episode start: repeat the first observation
                    if entry is None:
                        return None, (f'{key} has no entry within '
                                      f'{self.tolerance_ns / 1e6:.0f} ms of step {i} '
                                      f'({target / 1e9:.3f} s)')
                    picked.append(entry)
                arrays[key] = np.stack([e[1] for e in picked])  # (T_o, ...)
                stamps[key] = [e[0] for e in picked]
                newest_arrival = max(newest_arrival, picked[-1][2])
            return Window(t_ref, arrays, newest_arrival, stamps), ''

    def may_pick(self, key: str, stamp_ns: int, not_before_ns: Optional[int] = None) -> bool:
        """Return False when no future window can pick this entry of ``key``.

        A future window's reference stamp is at least the newest stamp every stream has
        reached now and at least ``not_before_ns`` (when the next chunk is due); its steps
        lie at most ``(T_o - 1) * dt`` before it and an entry must be within the sync
        tolerance of a step. An entry older than that is never picked, nor one with a newer
        entry at or before the earliest step (that one is nearer every step), except the
        first of an episode (it pads the earlier steps).

        Args:
            not_before_ns: the earliest reference stamp of the next window (None: any).
        """
        with self._lock:
            if self._first.get(key) == stamp_ns:
                return True
            newest = [s[-1][0] for s in self._streams.values() if s]
            bounds = [b for b in (not_before_ns, min(newest) if len(newest) == len(
                self._streams) else None) if b is not None]
            if not bounds:
                return True
            earliest_step = max(bounds) - (self.n_steps - 1) * self.dt_ns
            if stamp_ns < earliest_step - self.tolerance_ns:
                return False
            # A newer entry at or before the earliest step is nearer every future step.
            stamps = self._stamps[key]
            i = bisect.bisect_right(stamps, stamp_ns)
            return not (i < len(stamps) and stamps[i] <= earliest_step)

    def _nearest(self, stream, stamps, target: int):
        i = bisect.bisect_left(stamps, target)
        candidates = [stream[j] for j in (i - 1, i) if 0 <= j < len(stream)]
        best = min(candidates, key=lambda e: abs(e[0] - target))
        return best if abs(best[0] - target) <= self.tolerance_ns else None

    def set_timing(self, tolerance_ns: int, jump_ns: int) -> None:
        """Change the sync tolerance and the time-jump threshold (run-time parameters)."""
        with self._lock:
            self.tolerance_ns, self.jump_ns = tolerance_ns, jump_ns

    def missing(self) -> List[str]:
        """Keys of the streams with no entry since the last :meth:`clear`."""
        with self._lock:
            return [k for k, s in self._streams.items() if not s]

    def ages(self, now_ns: int, now_mono: Optional[float] = None) -> Dict[str, float]:
        """Age of each stream's newest entry by :func:`input_age_s` (the staleness rule).

        A stream with no entry since the last :meth:`clear` (start-up or reset) counts as
        having been waiting since then, so a missing input turns stale like a silent one.
        """
        now_mono = time.monotonic() if now_mono is None else now_mono
        with self._lock:
            return {k: (input_age_s(s[-1][0], s[-1][2], now_ns, now_mono) if s
                        else now_mono - self._cleared_at)
                    for k, s in self._streams.items()}


def input_age_s(stamp_ns: int, arrival: float, now_ns: int,
                now_mono: Optional[float] = None) -> float:
    """Age of an input in seconds: the one staleness rule of the node.

    An input is as old as the larger of its stamp's age on the node clock and the wall time
    since it arrived, so neither a late-delivered message nor a silent topic that was
    stamped recently counts as fresh. A stamp ahead of the clock adds no age (intake rejects
    stamps beyond ``max_future_stamp_s``); a node clock at 0 (sim time before the first
    ``/clock``) leaves only the arrival age. The intake, the chunk gate and the diagnostics
    all compare this age with ``max_obs_age_s``.
    """
    now_mono = time.monotonic() if now_mono is None else now_mono
    stamp_age = (now_ns - stamp_ns) / 1e9 if now_ns > 0 else 0.0
    return max(stamp_age, now_mono - arrival)


def future_by_s(stamp_ns: int, now_ns: int) -> float:
    """Seconds a stamp lies ahead of the node clock (<= 0: not in the future; 0 without clock)."""
    return (stamp_ns - now_ns) / 1e9 if now_ns > 0 else 0.0
