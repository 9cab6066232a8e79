"""Run statistics of the policy node: latency percentiles, chunk rate, counters (no ROS)."""

from collections import Counter
from collections import deque
import threading
import time
from typing import Dict

import numpy as np

# Bounded so that a node running for days keeps a flat memory profile.
HISTORY = 5000
RECENT = 200


def percentile(values, q: float) -> float:
    """Percentile of a sequence, NaN when empty."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float(
        'nan')


class RunStats:
    """Thread-safe counters and rolling windows for diagnostics and the exit summary."""

    def __init__(self):
        self._lock = threading.Lock()
        self.inference_ms = deque(maxlen=HISTORY)
        self.obs_to_chunk_ms = deque(maxlen=HISTORY)
        self.steady_obs_to_chunk_ms = deque(maxlen=HISTORY)  # without forced-dense chunks
        # Observation stamp to publication on the node's clock (sim time under use_sim_time):
        # the latency the robot's world sees, which rtc's delay estimate is built from.
        self.stamp_to_chunk_ms = deque(maxlen=HISTORY)
        self.sparsity = deque(maxlen=HISTORY)
        self.chunk_times = deque(maxlen=HISTORY)
        self.counters = Counter()
        self.started = time.monotonic()

    def count(self, what: str, n: int = 1) -> None:
        """Increment a named counter (rejections, drops, resets, ...)."""
        with self._lock:
            self.counters[what] += n

    def chunk(self, inference_ms: float, obs_to_chunk_ms: float, sparsity: float,
              dense: bool, stamp_to_chunk_ms: float = float('nan')) -> None:
        """Record one published chunk; its stamp-to-publication time is on the node clock."""
        with self._lock:
            self.inference_ms.append(inference_ms)
            if np.isfinite(stamp_to_chunk_ms):
                self.stamp_to_chunk_ms.append(stamp_to_chunk_ms)
            self.obs_to_chunk_ms.append(obs_to_chunk_ms)
            if not dense:
                self.steady_obs_to_chunk_ms.append(obs_to_chunk_ms)
            self.sparsity.append(sparsity)
            self.chunk_times.append(time.monotonic())
            self.counters['chunks'] += 1
            self.counters['dense_chunks'] += int(dense)

    def samples(self) -> Dict[str, list]:
        """Per-chunk latencies of the run (bounded), for plots: ms, oldest first."""
        with self._lock:
            return {'inference_ms': list(self.inference_ms),
                    'obs_to_chunk_ms': list(self.obs_to_chunk_ms),
                    'steady_obs_to_chunk_ms': list(self.steady_obs_to_chunk_ms)}

    def chunk_rate(self, window_s: float = 10.0) -> float:
        """Chunks per second over the last ``window_s`` seconds of wall time."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self.chunk_times if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(1e-9, recent[-1] - recent[0])

    def snapshot(self, recent: bool = True) -> Dict[str, float]:
        """Latency percentiles, rate, sparsity and counters (recent window or whole run)."""
        with self._lock:
            n = RECENT if recent else HISTORY
            inf = list(self.inference_ms)[-n:]
            o2c = list(self.obs_to_chunk_ms)[-n:]
            steady = list(self.steady_obs_to_chunk_ms)[-n:]
            stamp = list(self.stamp_to_chunk_ms)[-n:]
            sp = list(self.sparsity)[-n:]
            times = list(self.chunk_times)
            counters = dict(self.counters)
        out = {
            'latency_p50_ms': percentile(inf, 50), 'latency_p99_ms': percentile(inf, 99),
            'obs_to_chunk_p50_ms': percentile(o2c, 50),
            'obs_to_chunk_p99_ms': percentile(o2c, 99),
            'steady_obs_to_chunk_p50_ms': percentile(steady, 50),
            'steady_obs_to_chunk_p99_ms': percentile(steady, 99),
            'stamp_to_chunk_p50_ms': percentile(stamp, 50),
            'stamp_to_chunk_p90_ms': percentile(stamp, 90),
            'stamp_to_chunk_p99_ms': percentile(stamp, 99),
            'realized_sparsity': float(np.mean(sp)) if sp else float('nan'),
        }
        if recent:
            out['chunk_rate_hz'] = self.chunk_rate()
        else:
            span = times[-1] - times[0] if len(times) > 1 else 0.0
            out['chunk_rate_hz'] = (len(times) - 1) / span if span > 0 else 0.0
        out.update(counters)
        return out
