"""Policy node, outputs: the one place where an action leaves the node.

Every publish of an action (``~/next_action``, ``~/target_pose``, ``~/joint_trajectory``,
``~/gripper_command``; steps, holds and the stop at deactivation) is in this file and passes
the safety layer (ros/safety.py) first; ``~/action_chunk`` is published by the worker with
values from the same layer. What a hold sends per mode: :meth:`OutputsMixin._send_hold`
and docs/safety.md.
"""

from typing import Optional

from geometry_msgs.msg import PoseStamped
import numpy as np
from sensor_msgs.msg import JointState
from sparse_policy_node.ros import actions as act
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros import execution as ex
from sparse_policy_node.ros import gripper
from sparse_policy_node.ros.safety import Hold
from std_msgs.msg import Float64
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory


class OutputsMixin:
    """Action outputs, holds and the control tick of :class:`PolicyNode`."""

    def _on_measured_pose(self, msg) -> None:
        frame = self.settings.pose_frame
        if frame and msg.header.frame_id != frame:
            return  # rejected and logged by the observation intake
        try:
            pose = conv.pose_to_vector(msg, 'pose').astype(np.float64)
        except conv.ConversionError:
            return  # rejected and logged by the observation intake
        p, q = pose[:3], pose[3:]
        with self._lock:
            self._poses.append((conv.stamp_to_ns(msg.header.stamp), p, q))

    def _on_measured_joints(self, msg) -> None:
        index = {n: i for i, n in enumerate(msg.name)}
        names = self.settings.output_joint_names
        if all(n in index for n in names) and len(msg.position) == len(msg.name):
            values = np.array([msg.position[index[n]] for n in names], float)
            if np.isfinite(values).all():
                with self._lock:
                    self._joints = values
                    self._joints_ns = self.get_clock().now().nanoseconds

    def _on_enable(self, msg) -> None:
        now = self.get_clock().now().nanoseconds
        with self._lock:
            timeout = self.safety.config.enable_timeout_s
            was = not self.safety.deadman.reason(now, timeout)
            self.safety.deadman.receive(bool(msg.data), now)
            on = not self.safety.deadman.reason(now, timeout)
            if not on:
                self._current = self._last = None   # never resume an old chunk
        if was != on:
            self.get_logger().warning('enable input: ' + (
                'enabled, commanding again' if on else 'disabled: holding'))
            self._wake.set()

    def _pose_msg(self, stamp_ns: int, position, quat) -> PoseStamped:
        msg = PoseStamped()
        msg.header.stamp = conv.ns_to_stamp(stamp_ns)
        msg.header.frame_id = self.settings.pose_frame
        p, o = msg.pose.position, msg.pose.orientation
        p.x, p.y, p.z = (float(v) for v in position)
        o.x, o.y, o.z, o.w = (float(v) for v in quat)
        return msg

    def _publish_plan(self, stamp_ns: int, actions: np.ndarray, plan) -> bool:
        """At chunk time (under the lock): the joint trajectory, or the current step.

        Returns False when the chunk must not go out: joint output with no reference for the
        joint limits (no trajectory sent, no joint state), or a chunk whose targets elapsed.
        """
        now = self.get_clock().now().nanoseconds
        if self.settings.output_mode == 'joint_trajectory':
            k0 = act.first_pending_step(stamp_ns, self.dt_ns, now, len(plan))
            if k0 >= len(plan):
                self.stats.count('late_chunks')  # every target has elapsed
                return False
            nj = len(self.settings.output_joint_names)
            times = stamp_ns + np.arange(k0, len(plan), dtype=np.int64) * self.dt_ns
            limited = self.safety.trajectory(times, plan[k0:], now, self._fresh_joints(now),
                                             slice(0, nj))
            if limited is None:
                self.stats.count('held_no_joint_state')
                self.get_logger().warning('holding: no measured joint state to limit the '
                                          'joint targets from; chunk not sent',
                                          throttle_duration_sec=5.0)
                return False
            if not np.allclose(limited, plan[k0:]):
                self.stats.count('safety_limited_steps')
            plan[k0:] = limited
            actions[k0:, :nj] = limited
            msg = JointTrajectory(joint_names=list(self.settings.output_joint_names))
            msg.header.stamp = conv.ns_to_stamp(stamp_ns)
            msg.points = conv.chunk_to_trajectory(plan[k0:], msg.joint_names, self.dt_ns,
                                                  conv.ns_to_stamp(stamp_ns)).points
            for i, point in enumerate(msg.points):
                point.time_from_start = conv.ns_to_duration((k0 + i) * self.dt_ns)
            self.joint_traj_pub.publish(msg)
            self._commanded = True
            self.stats.count('skipped_elapsed_targets', k0)
        return True

    def _publish_due_step(self) -> None:
        """After a chunk is committed: the step due now goes out at once (not joints)."""
        if self.settings.output_mode == 'joint_trajectory':
            return
        now = self.get_clock().now().nanoseconds
        step = self._exec.tick(now) if self._exec.kind == ex.DELTA else (
            None if self._exec.peek(now) is None else (self._exec.peek(now), 0))
        if step is not None:
            self._covered_ns = now
            self._publish_step(self._current, step[0])

    def _fresh_joints(self, now: int):
        """Return the measured joints (J,) if received within the measured max age."""
        if self._joints is None or self._joints_ns is None or \
                now - self._joints_ns > self.safety.config.measured_max_age_s * 1e9:
            return None
        return self._joints

    def _fresh_pose(self, now: int):
        """Return the newest measured pose (p, q) if it is recent enough, else None."""
        if not self._poses:
            return None
        ns, p, q = self._poses[-1]
        if now - ns > self.safety.config.measured_max_age_s * 1e9:
            return None
        return p, q

    def _publish_step(self, current, k: int) -> None:
        """Publish the outputs for step ``k`` of the current chunk (under the lock).

        Every value passes the safety layer, measured from what was sent last.
        """
        stamp_ns, actions, plan = current
        t = stamp_ns + k * self.dt_ns
        before, self._commanded = self.safety.limited, True
        value = self.safety.action(actions[k])
        msg = JointState(name=list(self.names), position=value.tolist())
        msg.header.stamp = conv.ns_to_stamp(t)
        self.next_pub.publish(msg)
        if self.settings.output_mode == 'pose_target':
            target = (plan[0][k], plan[1][k])
            if self._delta_reference == 'measured' and self._poses:
                # The delta is relative to the pose measured now (robosuite's OSC semantics).
                _, p, q = self._poses[-1]
                sc = self.card['action']['scaling']
                p = p + value[:3] * sc['position_m_per_unit']
                q = act.quat_mul(act.quat_from_rotvec(
                    value[3:6] * sc['rotation_rad_per_unit']), q)
                target = (p, q)
            now = self.get_clock().now().nanoseconds
            self._last_target = self.safety.pose(*target, reference=self._fresh_pose(now))
            self.target_pub.publish(self._pose_msg(t, *self._last_target))
        if self.gripper_index is not None:
            self._last_gripper = self.safety.gripper(value[self.gripper_index],
                                                     self.gripper_index)
            self._publish_gripper()
        if self.safety.limited > before:
            self.stats.count('safety_limited_steps', self.safety.limited - before)

    def _publish_gripper(self) -> None:
        """Publish the last gripper value sent, mapped as output.gripper_* say (ros/gripper.py)."""
        if self.gripper_pub is None:
            return
        s = self.settings
        value = gripper.command(self._last_gripper, s.output_gripper_mapping,
                                s.output_gripper_open, s.output_gripper_closed,
                                s.output_gripper_threshold)
        self.gripper_pub.publish(Float64MultiArray(data=[value])
                                 if s.output_gripper_msg == 'multi_array' else Float64(data=value))

    def _hold_now(self, now: int, covered: bool) -> Optional[Hold]:
        """Return why the node holds now (None to command): enable input, then the watchdog."""
        since = None
        if not covered:
            since = self._covered_ns if self._covered_ns is not None else self._activated_ns
        ages = self.history.ages(now) if self.safety.config.watchdog_s > 0 else {}
        return self.safety.hold(now, ages, since)

    def _hold(self, hold: Hold, now: int) -> None:
        """Hold (under the lock): log once per hold, drop the chunk, send the hold output."""
        first = self._holding is None
        if first:
            self.stats.count('holds')
            self.get_logger().warning(f'holding: {hold.reason}')
        # A blocking hold (the enable input, stale inputs; not the watchdog's "no action",
        # which the chunk in flight ends): a chunk that was computing when one began is not
        # published (worker), even if the hold is over by then.
        if hold.blocking and not self._blocking:
            self._blocking_holds += 1
        self._blocking = hold.blocking
        self._holding = hold.reason
        self._current = None
        self._paused = True       # the next chunk starts dense (docs/safety.md)
        self._send_hold(now, first)

    def _release_hold(self) -> None:
        """Command again (under the lock): end the hold in force, if any, and log it."""
        if self._holding:
            self._holding, self._blocking = None, False
            self.get_logger().info('hold released: commanding again')

    def _send_hold(self, now: int, first: bool, stopping: bool = False) -> str:
        """Send the output mode's hold command through the safety layer; say what was sent.

        Never a place the arm is not at: chunk output sends zero motion for deltas and the
        last action sent for absolute actions; pose_target the last target sent (else the
        measured pose, if recent); joint_trajectory, once, a one-point trajectory at the
        target in force now (else the measured joints): the arm stops, it is not pulled back.
        With ``safety.hold_output: silent`` nothing is sent (``stopping``, at deactivation,
        sends the stop anyway). The gripper command is repeated unchanged.
        """
        if self.safety is None:
            return 'nothing sent (not configured)'
        if self.safety.config.hold_output == 'silent' and not stopping:
            if first:
                self.safety.forget()  # another source may drive: restart from measurements
            return 'nothing sent (silent hold)'
        stamp, mode, sent = conv.ns_to_stamp(now), self.settings.output_mode, 'nothing sent'
        if mode == 'chunk':
            values = None
            if self.kind == ex.DELTA:
                values = np.zeros(self.action_dim)
                if self.gripper_index is not None and self._last_gripper is not None:
                    values[self.gripper_index] = self._last_gripper
            elif self.safety.sent.action is not None:
                values = self.safety.sent.action
            if values is not None:
                msg = JointState(name=list(self.names),
                                 position=self.safety.action(values, hold=True).tolist())
                msg.header.stamp = stamp
                self.next_pub.publish(msg)
                sent = 'sent zero motion' if self.kind == ex.DELTA else \
                    'repeated the last action'
        elif mode == 'pose_target':
            target = self.safety.sent.pose or self._fresh_pose(now)
            if target is not None:
                self._last_target = self.safety.pose(*target)
                self.target_pub.publish(self._pose_msg(now, *self._last_target))
                sent = 'repeated the last target pose'
        elif first:
            joints = self.safety.joint_stop(now, self._fresh_joints(now))
            if joints is None:
                self.get_logger().warning('no joint target in force and no recent joint state '
                                          'to stop at: nothing sent')
            else:
                msg = JointTrajectory(joint_names=list(self.settings.output_joint_names))
                msg.points = conv.chunk_to_trajectory(
                    joints[None], msg.joint_names, self.dt_ns, stamp).points
                msg.points[0].time_from_start = conv.ns_to_duration(self.dt_ns)
                self.joint_traj_pub.publish(msg)
                sent = 'sent a stop at the joint target in force'
        if self._last_gripper is not None:
            self._publish_gripper()
        return sent

    def _on_control_tick(self) -> None:
        now = self.get_clock().now().nanoseconds
        with self._lock:
            if not self._active:
                return
            current = self._current
            covered = current is not None and self._exec.covers(now)
            if covered:
                self._covered_ns = now
            hold = self._hold_now(now, covered)
            if hold:
                self._hold(hold, now)
                return
            self._release_hold()
            step = self._exec.tick(now) if covered else None
            if step is not None:
                self._publish_step(current, step[0])
