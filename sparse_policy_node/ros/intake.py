"""Policy node, intake: observation callbacks, rejections, resets and live parameters.

Runs on the executor thread and stays cheap: callbacks convert and store, the worker
(ros/worker.py) computes. Live ``safety.*`` changes are applied here, from the next tick.
"""

import time

from geometry_msgs.msg import PoseStamped
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros import params
from sparse_policy_node.ros.node_common import REJECT_LOG_PERIOD_S
from sparse_policy_node.ros.obs_history import ACCEPTED
from sparse_policy_node.ros.obs_history import future_by_s
from sparse_policy_node.ros.obs_history import TIME_JUMP


class IntakeMixin:
    """Observation intake of :class:`PolicyNode` (a mixin; state set up by configure)."""

    def _on_image(self, key, msg) -> None:
        try:
            mode, flip = self._image_prep.get(key, ('squash', False))
            self._add(key, msg.header.stamp, conv.image_to_chw(msg, self.image_size, mode,
                                                               flip))
        except conv.ConversionError as exc:
            self._reject(key, exc)

    def _on_lowdim(self, group, msg) -> None:
        frame = self.settings.pose_frame
        if isinstance(msg, PoseStamped) and frame and msg.header.frame_id != frame:
            for src in group:
                self.stats.count('frame_mismatches')
                self._reject(src.key, conv.ConversionError(
                    f'pose in frame {msg.header.frame_id!r}, expected pose_frame '
                    f'{frame!r} (transform it, or set pose_frame)'))
            return
        for src in group:
            try:
                self._add(src.key, msg.header.stamp, conv.extract_lowdim(src, msg))
            except conv.ConversionError as exc:
                self._reject(src.key, exc)

    def _add(self, key, stamp, value) -> None:
        ns = conv.stamp_to_ns(stamp)
        if ns == 0:
            raise conv.ConversionError('message is not stamped (header.stamp is 0)')
        ahead = future_by_s(ns, self.get_clock().now().nanoseconds)
        if ahead > self.settings.max_future_stamp_s:
            self.stats.count('future_stamps')
            raise conv.ConversionError(f'stamped {ahead:.3f} s ahead of the node clock '
                                       f'(max_future_stamp_s='
                                       f'{self.settings.max_future_stamp_s}); wrong clock?')
        status = self.history.add(key, ns, value)
        if status == TIME_JUMP:
            self._reset(f'time jumped back on {key}', keep_floor=False)
            status = self.history.add(key, ns, value)
        if status != ACCEPTED:
            self.stats.count(f'dropped_{status}')
            return
        self._inputs_version += 1
        if key in self.image_keys and self.settings.encode_on_arrival:
            self._frames.append((key, (self._episode, ns), value))
            self._frames_ready.set()
        self._wake.set()

    def _reject(self, key, exc) -> None:
        """Count a rejected input; log it, at most every 5 s per key (not per call site)."""
        self.stats.count(f'rejected_{key}')
        now, last = time.monotonic(), self._reject_logged.get(key)
        if last is None or now - last >= REJECT_LOG_PERIOD_S:
            self._reject_logged[key] = now
            self.get_logger().warning(f'rejected {key}: {exc}')

    def _reset(self, reason: str, keep_floor: bool = True) -> None:
        with self._lock:
            self._episode += 1
            # Messages captured before now belong to the old episode, even if they arrive
            # after the reset request (topics and services are not ordered).
            self.history.clear(self.get_clock().now().nanoseconds if keep_floor else None)
            self._last = self._current = None
            self._last_target = None
            if self.safety is not None:
                self.safety.deadman.clear()
                self.safety.forget()
        self.stats.count('resets')
        self.get_logger().info(f'new episode ({reason}): caches cleared, next chunk dense')
        self._wake.set()

    def _on_reset(self, request, response):
        self._reset('reset service')
        response.success, response.message = True, 'new episode; next chunk is dense'
        return response

    def _mark_dirty(self) -> None:
        if self.engine is None:
            return  # configure reads the parameters
        self._apply_safety()
        self._dirty = True
        self._wake.set()

    def _apply_safety(self) -> None:
        """Apply the safety.* and action bound parameters from the next tick on."""
        try:
            s = params.settings_from_params(self)
            config = self._safety_config(s)
        except ConfigError as exc:  # validated on set: only reached by a concurrent change
            self.get_logger().error(f'safety parameters not applied: {exc}')
            return
        with self._lock:
            self.safety.update(config)
            self._eef_limited = self._eef_limits_set(s)
