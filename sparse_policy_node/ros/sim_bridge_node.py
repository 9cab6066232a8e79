"""robosuite bridge node: stands in for a real arm and its drivers.

Publishes what an arm driver would: ``<camera>/image_raw`` (sensor_msgs/Image, rgb8),
``joint_states`` (gripper fingers) and ``ee_pose`` (geometry_msgs/PoseStamped), all stamped
with the simulation time it also publishes on ``/clock`` (or with wall time). It executes
incoming ``trajectory_msgs/JointTrajectory`` chunks action by action, calls the policy's
``~/reset`` before each episode and publishes each episode's result on ``~/episode_result``.

Lockstep mode (default) waits for the chunk computed from the current observation before
stepping, so sim time pauses during inference and results do not depend on CPU speed. Real
time mode steps on the wall clock and executes the delta actions of the newest chunk each
once, in order (:mod:`~sparse_policy_node.ros.execution`): a late chunk starts at its first
action not yet covered by an executed one, never at the step the clock has reached.
``real_time_factor`` < 1 slows the world against the wall clock (sim time still advances one
control period per step): a node on ``use_sim_time`` then sees its latency scaled by the
factor, and a shared CPU that cannot step the simulator at the control rate keeps the pace.

With ``action_mode: pose_target`` the bridge acts as a Cartesian controller instead: it tracks
the policy node's ``~/target_pose`` stream (geometry_msgs/PoseStamped, one per control step,
in ``frame_id``) and ``~/gripper_command`` (std_msgs/Float64), turning each target into the
OSC pose delta that moves the simulated arm towards it.
"""

from collections import Counter
import json
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import PoseStamped
import numpy as np
from rclpy.executors import ExternalShutdownException
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rclpy.task import Future
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from sensor_msgs.msg import JointState
from sparse_policy_node.core import keys
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.ros import actions as act
from sparse_policy_node.ros import compat
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros import execution as ex
from sparse_policy_node.ros import params
from sparse_policy_node.ros.services import call_service
from sparse_policy_node.ros.stats import percentile
from std_msgs.msg import Float64
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

# robosuite OSC_POSE: an input of 1 moves 0.05 m / 0.5 rad (the model card's scaling).
POSITION_SCALE, ROTATION_SCALE = 0.05, 0.5
SIM_START_NS = 1_000_000_000  # sim time starts at 1 s: a zero stamp means "not stamped"


def robosuite_env(settings):
    """Create the simulation-layer environment (imported lazily: robosuite is optional)."""
    from sparse_policy_node.sim.robosuite_env import make_env
    return make_env(settings.task, settings.cameras, tuple(settings.image_size),
                    max_steps=settings.max_episode_steps,
                    include_object=settings.publish_object_state)


def object_state_msg(obs, stamp) -> JointState:
    """Return the object state as a JointState named ``object_0..object_{D-1}``.

    Raises:
        ValueError: the observation has no ``object`` vector (environment built without it).
    """
    if keys.OBJECT not in obs:
        raise ValueError('publish_object_state needs observations with the object state '
                         '(an environment made with include_object)')
    values = [float(v) for v in obs[keys.OBJECT]]
    msg = JointState(name=[f'object_{i}' for i in range(len(values))], position=values)
    msg.header.stamp = stamp
    return msg


class SimBridgeNode(Node):
    """Run episodes of a simulated task and exchange observations and chunks over ROS."""

    def __init__(self, env_factory=robosuite_env, **kwargs):
        super().__init__('sim_bridge', **kwargs)
        params.declare_bridge_parameters(self)
        s = self.settings = params.bridge_settings_from_params(self)
        self.dt_ns = int(round(1e9 / s.control_rate_hz))
        # The simulator is built, stepped and closed by the episode thread only: an offscreen
        # (EGL / OSMesa) rendering context is current in the thread that created it, and
        # rendering from another thread returns stale or black images.
        self._env_factory = env_factory
        self.env = None
        self.image_pubs = {c: self.create_publisher(Image, s.image_topic_format.format(
            camera=c), qos_profile_sensor_data) for c in s.cameras}
        self.joint_pub = self.create_publisher(JointState, s.joint_states_topic,
                                               qos_profile_sensor_data)
        self.pose_pub = self.create_publisher(PoseStamped, s.pose_topic,
                                              qos_profile_sensor_data)
        self.clock_pub = self.create_publisher(Clock, '/clock', 10) if s.publish_clock else None
        self.object_pub = self.create_publisher(
            JointState, s.object_state_topic, qos_profile_sensor_data) \
            if s.publish_object_state else None
        self.result_pub = self.create_publisher(DiagnosticStatus, '~/episode_result', 10)
        if s.action_mode == 'pose_target':
            self.create_subscription(PoseStamped, s.target_topic, self._on_target, 10)
            self.create_subscription(Float64, s.gripper_topic, self._on_gripper, 10)
        else:
            self.create_subscription(JointTrajectory, s.action_topic, self._on_chunk, 10)
        self._targets = {}            # stamp ns -> (position, quaternion) of pose targets
        self._gripper = -1.0          # last gripper command (open until told otherwise)
        self.reset_client = self.create_client(Trigger, s.reset_service)
        self.t_ns = SIM_START_NS if s.publish_clock else self.get_clock().now().nanoseconds
        self._cond = threading.Condition()
        self._chunk = None            # (stamp_ns, (n, A) actions)
        # Real time: delta chunks run once each, in order, aligned by executed steps (an
        # observation stamped t reflects the actions of the steps before t).
        self._queue = ex.ChunkExecutor(ex.DELTA, self.dt_ns)
        self._sent = {}               # obs stamp -> monotonic publish time (round trip)
        self.round_trip_ms, self.results = [], []
        self.arrival_steps = Counter()  # chunks per arrival delay (control steps)
        self.counters = {'chunks': 0, 'underruns': 0, 'startup_underruns': 0, 'republished': 0,
                         'bad_chunks': 0, 'stale_chunks': 0, 'targets': 0, 'bad_targets': 0}
        self._episode_start_ns = self._episode_chunks = 0
        # |da|, |d2a| of the executed chunk actions, at chunk boundaries and within chunks:
        # [count, sum, max] each (bounded memory on an endless run).
        self._smoothness = {k: [0, 0.0, 0.0] for k in
                            ('da_within', 'da_boundary', 'd2a_within', 'd2a_boundary')}
        self.stop = threading.Event()
        self.finished = Future()
        self._thread = threading.Thread(target=self._run, name='episodes', daemon=True)
        self._thread.start()

    # ==== ROS I/O ====

    def _on_chunk(self, msg) -> None:
        try:
            stamp, _, actions = conv.trajectory_to_chunk(msg)
        except conv.ConversionError as exc:
            self.counters['bad_chunks'] += 1
            self.get_logger().warning(f'ignoring chunk: {exc}', throttle_duration_sec=5.0)
            return
        with self._cond:
            if not self._accept_locked(stamp):
                return
            self._chunk = (stamp, actions)
            if not self.settings.lockstep:
                self._queue.add(stamp, actions, self.t_ns)
                # Control steps that ran since the chunk's observation: the delay d the world
                # saw (its first d actions came too late to run).
                self.arrival_steps[int((self.t_ns - stamp) // self.dt_ns)] += 1
            self._episode_chunks += 1
            self.counters['chunks'] += 1
            self._cond.notify_all()

    def _accept_locked(self, stamp: int) -> bool:
        """Refuse output of the previous episode's observations; time the round trip.

        Call with ``self._cond`` held. Returns False (counted as stale) for a stamp before the
        current episode's start: it was computed from the previous episode and must never be
        executed here.
        """
        if stamp < self._episode_start_ns:
            self.counters['stale_chunks'] += 1
            return False
        sent = self._sent.pop(stamp, None)
        if sent is not None:
            self.round_trip_ms.append((time.monotonic() - sent) * 1e3)
        return True

    def _on_target(self, msg) -> None:
        if msg.header.frame_id != self.settings.frame_id:
            self.counters['bad_targets'] += 1
            self.get_logger().warning(f'ignoring target in frame {msg.header.frame_id!r} '
                                      f'(expected {self.settings.frame_id!r})',
                                      throttle_duration_sec=5.0)
            return
        try:
            pose = conv.pose_to_vector(msg, 'pose').astype(np.float64)
        except conv.ConversionError as exc:
            self.counters['bad_targets'] += 1
            self.get_logger().warning(f'ignoring target: {exc}', throttle_duration_sec=5.0)
            return
        stamp = conv.stamp_to_ns(msg.header.stamp)
        with self._cond:
            if not self._accept_locked(stamp):
                return
            self._targets[stamp] = (pose[:3], pose[3:])
            for old in sorted(self._targets)[:-64]:
                del self._targets[old]
            self._episode_chunks += 1
            self.counters['targets'] += 1
            self._cond.notify_all()

    def _on_gripper(self, msg) -> None:
        if np.isfinite(msg.data):
            with self._cond:
                self._gripper = float(np.clip(msg.data, -1.0, 1.0))

    def _track(self, target, obs) -> np.ndarray:
        """Return the OSC delta action that moves the arm from ``obs`` towards ``target``."""
        position, quat = target
        dp = (position - obs['robot0_eef_pos']) / POSITION_SCALE
        dr = act.rotvec_from_quat(act.quat_mul(quat, act.quat_conj(
            np.asarray(obs['robot0_eef_quat'], np.float64)))) / ROTATION_SCALE
        with self._cond:
            gripper = self._gripper
        return np.clip(np.concatenate([dp, dr, [gripper]]), -1.0, 1.0)

    def _target_action(self, obs):
        """Pose-target mode: return the action of the current step, or None when stopped.

        Lockstep waits for the target stamped with the current step; real time tracks the
        newest target at or before it (the last one when none is new: the arm holds there).
        """
        waited = 0.0
        while not self.stop.is_set():
            with self._cond:
                if self.settings.lockstep:
                    ready = self._cond.wait_for(lambda: self.t_ns in self._targets, 1.0)
                else:
                    ready = True
                past = [t for t in self._targets if t <= self.t_ns]
                target = self._targets[max(past)] if past else None
                gripper = self._gripper
            if ready:
                if target is None:
                    self.counters['startup_underruns'] += 1
                    return np.concatenate([np.zeros(6), [gripper]])
                if max(past) != self.t_ns:
                    self.counters['underruns'] += 1
                return self._track(target, obs)
            waited += 1.0
            self.counters['republished'] += 1
            self._publish(obs)
            if waited % self.settings.chunk_timeout_s < 1.0:
                self.get_logger().warning(f'no target for t={self.t_ns / 1e9:.2f} s after '
                                          f'{waited:.0f} s; is the policy node in '
                                          f'output.mode pose_target?')
        return None

    def _publish(self, obs) -> None:
        stamp = conv.ns_to_stamp(self.t_ns)
        if self.clock_pub is not None:
            self.clock_pub.publish(Clock(clock=stamp))
        for cam, pub in self.image_pubs.items():
            pub.publish(conv.rgb_to_image(obs[keys.image_key(cam)], 'rgb8', stamp,
                                          f'{cam}_optical_frame'))
        js = JointState(name=list(self.settings.gripper_joint_names),
                        position=[float(v) for v in obs['robot0_gripper_qpos']])
        js.header.stamp = stamp
        self.joint_pub.publish(js)
        pose = PoseStamped()
        pose.header.stamp, pose.header.frame_id = stamp, self.settings.frame_id
        p, q = obs['robot0_eef_pos'], obs['robot0_eef_quat']  # quaternion x, y, z, w
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = map(float, p)
        (pose.pose.orientation.x, pose.pose.orientation.y, pose.pose.orientation.z,
         pose.pose.orientation.w) = map(float, q)
        self.pose_pub.publish(pose)
        if self.object_pub is not None:
            self.object_pub.publish(object_state_msg(obs, stamp))
        with self._cond:
            self._sent = {self.t_ns: time.monotonic()}

    def _reset_policy(self, first: bool) -> None:
        """Call the policy's reset; at start-up wait until the policy node is up."""
        while not self.stop.is_set():
            if call_service(self.reset_client, Trigger.Request(), timeout=5.0,
                            discovery_timeout=1.0) is not None:
                return
            if not first:
                self.get_logger().warning('policy reset service did not answer; continuing')
                return
            self.get_logger().info('waiting for the policy node...', throttle_duration_sec=10.0)

    # ==== episodes (worker thread) ====

    def _covering(self):
        """Actions of the newest chunk from the current step on, or None."""
        if self._chunk is None:
            return None
        stamp, actions = self._chunk
        k = (self.t_ns - stamp) // self.dt_ns
        return actions[k:] if 0 <= k < len(actions) and stamp <= self.t_ns else None

    def _wait_chunk(self, obs):
        """Lockstep: wait for a chunk covering the current step; re-send the observation."""
        waited = 0.0
        while not self.stop.is_set():
            with self._cond:
                # Normally the chunk is stamped exactly now; an older chunk that still covers
                # this step (the node's horizon changed, a chunk crossed a restart) is used
                # from the current step on instead of waiting forever.
                if self._cond.wait_for(lambda: self._covering() is not None, timeout=1.0):
                    actions = self._covering()
                    self._chunk = None
                    return actions
            waited += 1.0
            # A best-effort message may have been lost, or the policy node restarted.
            self.counters['republished'] += 1
            self._publish(obs)
            if waited % self.settings.chunk_timeout_s < 1.0:
                self.get_logger().warning(f'no chunk for t={self.t_ns / 1e9:.2f} s after '
                                          f'{waited:.0f} s; is the policy node running?')
        return None

    def _realtime_action(self, hold):
        """Return (action, stamp of the chunk it came from; -1: a hold) for this tick."""
        with self._cond:
            step = self._queue.tick(self.t_ns)
            if step is not None:
                return self._queue.current[2][step[0]], self._queue.current[0]
        # No chunk covers this step yet: hold still. Before the episode's first chunk (dense
        # by rule, the slowest) it is a start-up wait, not the policy falling behind.
        self.counters['underruns' if self._episode_chunks else 'startup_underruns'] += 1
        return hold, -1

    def _episode(self, index: int) -> dict:
        s = self.settings
        self._reset_policy(first=index == 0)
        seed = s.seed + index
        obs = self.env.reset(seed)
        # Time moves on across a reset: the policy drops late messages stamped at or before
        # the last step of the previous episode.
        self.t_ns += self.dt_ns
        with self._cond:
            self._chunk = None
            self._queue.drop()
            self._targets, self._gripper = {}, -1.0
            self._episode_start_ns, self._episode_chunks = self.t_ns, 0
        self._publish(obs)
        steps, success, start, next_tick = 0, False, time.monotonic(), time.monotonic()
        hold = np.zeros(7)
        executed, executed_from = [], []  # actions sent, and the chunk (stamp) of each
        while steps < s.max_episode_steps and not self.stop.is_set():
            if s.action_mode == 'pose_target':
                action = self._target_action(obs)
                actions = None if action is None else [action]
            elif s.lockstep:
                actions = self._wait_chunk(obs)
                sources = [self.t_ns] * len(actions if actions is not None else [])
            else:
                action, source = self._realtime_action(hold)
                actions, sources = [action], [source]
            for i, action in enumerate(actions if actions is not None else []):
                if len(action) != len(hold):
                    raise ValueError(f'chunks have {len(action)} action dimensions; this '
                                     f'bridge executes {len(hold)} (OSC pose delta + '
                                     f'gripper): the model does not fit the task')
                hold = np.concatenate([np.zeros(len(action) - 1), action[-1:]])
                if s.action_mode != 'pose_target':
                    executed.append(np.asarray(action, dtype=float))
                    executed_from.append(sources[i])
                # The env's own done flag is ignored: the episode ends on the bridge's rules.
                obs, _, _, info = self.env.step(action)
                steps += 1
                self.t_ns += self.dt_ns
                self._publish(obs)
                success = success or bool(info.get('success', False))
                if (success and s.terminate_on_success) or steps >= s.max_episode_steps:
                    break
            if success and s.terminate_on_success:
                break
            if not s.lockstep:
                next_tick += self.dt_ns / 1e9 / s.real_time_factor
                time.sleep(max(0.0, next_tick - time.monotonic()))
        # last_stamp_ns: the stamp of the episode's last observation (replay-bag resets the
        # policy after it: topics are not ordered, so the result may arrive before it).
        result = {'episode': index, 'seed': seed, 'success': success, 'length': steps,
                  'wall_s': round(time.monotonic() - start, 3), 'last_stamp_ns': self.t_ns}
        if executed:
            for key, values in ex.smoothness(np.stack(executed), executed_from).items():
                acc = self._smoothness[key]
                acc[0], acc[1] = acc[0] + len(values), acc[1] + sum(values)
                acc[2] = max([acc[2], *values])
        self.result_pub.publish(conv.make_status(
            f'sim_bridge: episode {index}',
            DiagnosticStatus.OK if success else DiagnosticStatus.WARN,
            'success' if success else 'failure', result))
        self.get_logger().info(f'episode {index} (seed {seed}): '
                               f'{"success" if success else "failure"} in {steps} steps')
        return result

    def _run(self) -> None:
        code = 0
        try:
            self.env = self._env_factory(self.settings)
            index = 0
            while not self.stop.is_set() and (self.settings.episodes == 0
                                              or index < self.settings.episodes):
                result = self._episode(index)
                if not self.stop.is_set():
                    self.results.append(result)
                index += 1
        except Exception as exc:  # noqa: B902 - report, then end the node with an error
            if not self.stop.is_set():
                self.get_logger().error(f'episode loop failed: {exc!r}')
                code = 1
        finally:
            close = getattr(self.env, 'close', None)
            if close is not None:
                close()
        if not self.finished.done():
            self.finished.set_result(code)

    def summary(self) -> dict:
        """Success rate, episode lengths, chunk round trip and counters of the run so far."""
        n = len(self.results)
        wins = sum(r['success'] for r in self.results)
        wall = sum(r['wall_s'] for r in self.results)
        steps = sum(r['length'] for r in self.results)
        return dict({'task': self.settings.task, 'episodes': n, 'successes': wins,
                     'success_rate': wins / n if n else float('nan'),
                     'mean_length': steps / n if n else float('nan'),
                     'steps_per_wall_s': steps / wall if wall else float('nan'),
                     'round_trip_p50_ms': percentile(self.round_trip_ms, 50),
                     'round_trip_p99_ms': percentile(self.round_trip_ms, 99),
                     'arrival_delay_steps': {str(d): self.arrival_steps[d]
                                             for d in sorted(self.arrival_steps)},
                     'smoothness': self._smoothness_summary(),
                     'results': self.results}, **self.counters)

    def _smoothness_summary(self) -> dict:
        """Mean and max of each difference set (None: no difference of that kind ran)."""
        out = {}
        for key, (n, total, largest) in self._smoothness.items():
            out[f'{key}_mean'] = total / n if n else None
            out[f'{key}_max'] = largest if n else None
        return out

    def close(self) -> dict:
        """Stop the episode loop, release the simulator and write the summary file."""
        self.stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=10.0)
        summary = self.summary()
        if self.settings.summary_file:
            with open(self.settings.summary_file, 'w') as f:
                json.dump(summary, f, indent=2)
        return summary


def main(args=None) -> int:
    """Run the bridge until its episodes are done (exit 0) or it is stopped."""
    code = 0
    try:
        with compat.ros_session(args):  # Humble/Jazzy: rclpy.init is no context manager
            try:
                node = SimBridgeNode()
            except (ConfigError, ImportError, ValueError, RuntimeError) as exc:
                print(f'[sim_bridge] cannot start: {exc}', file=sys.stderr)
                return 1
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            try:
                executor.spin_until_future_complete(node.finished)
                code = node.finished.result() if node.finished.done() else 0
            finally:
                summary = node.close()
                print(f'[sim_bridge] summary: {json.dumps(summary)}', file=sys.stderr)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    return code


if __name__ == '__main__':
    sys.exit(main())
