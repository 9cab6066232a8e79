"""A fake robot driver and DDS isolation for tests and benchmarks of the policy node.

:class:`FakeRobot` publishes what the bridge would (images, joint states, end-effector pose)
with chosen stamps and defects, and collects chunks, next actions and diagnostics.
"""

import os
import socket
import threading
import time
from typing import Optional

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
import numpy as np
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from sensor_msgs.msg import JointState
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros.services import call_service
from std_msgs.msg import Bool
from std_msgs.msg import Float64
from trajectory_msgs.msg import JointTrajectory

FINGERS = ['panda_finger_joint1', 'panda_finger_joint2']
# Parameters that make the tiny test model valid and fast (it has no pruner).
TINY_PARAMS = {'sampler.name': 'ddim', 'sampler.steps': 10, 'sparsity.gate_source': 'static',
               'sparsity.target': 0.5, 'num_threads': 1}


def save_tiny_model(directory: str) -> str:
    """Save a seeded random-weight tiny policy to ``directory``; return the directory."""
    import torch
    from sparse_policy_node.core.checkpoint import save_policy
    from sparse_policy_node.core.config import tiny_config
    from sparse_policy_node.core.policy import DiffusionPolicy
    torch.manual_seed(0)
    save_policy(DiffusionPolicy(tiny_config()), directory)
    return directory


def domain_in_use(domain: int, participants: int = 4) -> bool:
    """Return True when a DDS participant on this host holds a discovery port of ``domain``.

    RTPS gives participant ``i`` of domain ``d`` the unicast discovery port
    ``7410 + 250 d + 2 i``; one of the first ``participants`` that cannot be bound is held.
    """
    for i in range(participants):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(('0.0.0.0', 7410 + 250 * domain + 2 * i))
            except OSError:
                return True
    return False


def isolate_ros(log_dir: str) -> None:
    """Keep DDS traffic on this host and in a domain of its own; logs under ``log_dir``.

    Unless ``ROS_DOMAIN_ID`` is set, the process takes the first domain from
    ``1 + pid % 200`` on that no participant on this host uses: two test runs on one machine
    (two checkouts, two CI jobs) would otherwise share a domain one time in 200, and each
    would see, and call, the other's ``policy_node`` services.
    """
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    if 'ROS_DOMAIN_ID' not in os.environ:
        candidates = [1 + (os.getpid() + k) % 200 for k in range(200)]
        os.environ['ROS_DOMAIN_ID'] = str(next(
            (d for d in candidates if not domain_in_use(d)), candidates[0]))
    os.environ['ROS_LOG_DIR'] = log_dir


def service_graph(node, name: str) -> dict:
    """Return what ``node``'s graph holds of service ``name`` (rmw judges "available" by it).

    rmw_fastrtps calls a service available when the graph has request readers and as many
    response writers, and the client's writer and reader are both matched. Each endpoint is
    ``namespace/node@participant`` (the first 12 bytes of its GUID, hex): an endpoint of a
    participant that is gone, or a server with only one of the two, shows here.
    """
    resolved = node.resolve_service_name(name)

    def endpoints(infos):
        return sorted(f'{i.node_namespace.rstrip("/")}/{i.node_name}@'
                      f'{bytes(list(i.endpoint_gid)[:12]).hex()}' for i in infos)
    return {
        'request_readers': endpoints(node.get_subscriptions_info_by_topic(
            f'rq{resolved}Request', no_mangle=True)),
        'response_writers': endpoints(node.get_publishers_info_by_topic(
            f'rr{resolved}Reply', no_mangle=True)),
        'request_writers': endpoints(node.get_publishers_info_by_topic(
            f'rq{resolved}Request', no_mangle=True)),
        'response_readers': endpoints(node.get_subscriptions_info_by_topic(
            f'rr{resolved}Reply', no_mangle=True)),
        'dev_shm_fastdds_files': len([f for f in _listdir('/dev/shm') if 'fastdds' in f]),
    }


def _listdir(path: str) -> list:
    try:
        return os.listdir(path)
    except OSError:
        return []


class Spinner:
    """Spin nodes in a background thread (a context manager)."""

    def __init__(self, context, *nodes):
        self.executor = SingleThreadedExecutor(context=context)
        for node in nodes:
            self.executor.add_node(node)
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self):
        try:
            self.executor.spin()
        except Exception:  # noqa: B902 - the context was shut down under the executor
            pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.executor.shutdown(timeout_sec=2.0)
        self._thread.join(timeout=5.0)


class FakeRobot(Node):
    """Publish synthetic observations; record chunks, next actions and diagnostics."""

    def __init__(self, camera='agentview', image_size=(32, 32), policy='policy_node',
                 sim_clock=False, gripper_msg=None, **kwargs):
        super().__init__('fake_robot', **kwargs)
        self.clock_pub = self.create_publisher(Clock, '/clock', 10) if sim_clock else None
        self.image_size = image_size
        self.rng = np.random.default_rng(0)
        self.image_pub = self.create_publisher(Image, f'{camera}/image_raw',
                                               qos_profile_sensor_data)
        self.joint_pub = self.create_publisher(JointState, 'joint_states',
                                               qos_profile_sensor_data)
        self.pose_pub = self.create_publisher(PoseStamped, 'ee_pose', qos_profile_sensor_data)
        self.cond = threading.Condition()
        self.chunks, self.next_actions, self.diagnostics = [], [], []
        self.chunk_times = []
        self.diagnostics_received = 0
        self.create_subscription(JointTrajectory, f'{policy}/action_chunk', self._on_chunk, 10)
        self.create_subscription(JointState, f'{policy}/next_action',
                                 lambda m: self._keep(self.next_actions, m), 10)
        self.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 10)
        # Outputs of the pose_target and joint_trajectory modes, and the enable input.
        self.targets, self.grippers, self.joint_trajectories = [], [], []
        self.create_subscription(PoseStamped, f'{policy}/target_pose',
                                 lambda m: self._keep(self.targets, m), 10)
        # gripper_msg: the type of ~/gripper_command (output.gripper_msg; Float64 if None).
        self.create_subscription(gripper_msg or Float64, f'{policy}/gripper_command',
                                 lambda m: self._keep(self.grippers, m), 10)
        self.create_subscription(JointTrajectory, f'{policy}/joint_trajectory',
                                 lambda m: self._keep(self.joint_trajectories, m), 10)
        self.enable_pub = self.create_publisher(Bool, f'{policy}/enable', 10)
        self._service_clients = {}

    def _keep(self, into, msg):
        with self.cond:
            into.append(msg)
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        """Wait until ``predicate()`` holds (checked whenever an output arrives)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.05))
            return True

    def publish_enable(self, on: bool):
        """Publish the policy node's enable input."""
        self.enable_pub.publish(Bool(data=bool(on)))

    def publish_clock(self, t_ns: int):
        """Publish /clock (sim time) at ``t_ns``."""
        self.clock_pub.publish(Clock(clock=conv.ns_to_stamp(t_ns)))

    def _on_chunk(self, msg):
        with self.cond:
            self.chunks.append(msg)
            self.chunk_times.append(time.time_ns())  # wall time of arrival, per chunk
            self.cond.notify_all()

    def _on_diag(self, msg):
        with self.cond:
            self.diagnostics_received += 1
            self.diagnostics.append(msg)
            del self.diagnostics[:-20]
            self.cond.notify_all()

    def publish_image(self, t_ns: int, image: Optional[Image] = None, encoding='rgb8'):
        """Publish a camera image stamped ``t_ns`` (random pixels unless given)."""
        if image is None:
            pixels = self.rng.integers(0, 256, (*self.image_size, 3), dtype=np.uint8)
            image = conv.rgb_to_image(pixels, encoding)
        image.header.stamp = conv.ns_to_stamp(t_ns)
        self.image_pub.publish(image)

    def publish_joints(self, t_ns: int, position=(0.02, -0.02), names=None):
        """Publish the gripper joint state stamped ``t_ns``."""
        msg = JointState(name=list(FINGERS if names is None else names),
                         position=[float(v) for v in position])
        msg.header.stamp = conv.ns_to_stamp(t_ns)
        self.joint_pub.publish(msg)

    def publish_pose(self, t_ns: int, position=(0.1, 0.0, 1.0), quat=(0.0, 1.0, 0.0, 0.0),
                     frame_id: str = 'world'):
        """Publish the end-effector pose stamped ``t_ns`` in ``frame_id``."""
        msg = PoseStamped()
        msg.header.stamp = conv.ns_to_stamp(t_ns)
        msg.header.frame_id = frame_id
        p, q = msg.pose.position, msg.pose.orientation
        p.x, p.y, p.z = map(float, position)
        q.x, q.y, q.z, q.w = map(float, quat)
        self.pose_pub.publish(msg)

    def publish_obs(self, t_ns: int, camera: bool = True):
        """Publish one complete observation step stamped ``t_ns`` (and /clock if simulated)."""
        if self.clock_pub is not None:
            self.clock_pub.publish(Clock(clock=conv.ns_to_stamp(t_ns)))
        if camera:
            self.publish_image(t_ns)
        self.publish_joints(t_ns)
        self.publish_pose(t_ns)

    def wait_chunk(self, stamp_ns: Optional[int] = None, timeout: float = 5.0,
                   count: Optional[int] = None):
        """Wait for a chunk stamped ``stamp_ns`` (or for ``count`` chunks); return it/None."""
        def ready():
            if count is not None:
                return len(self.chunks) >= count
            return any(conv.stamp_to_ns(c.header.stamp) == stamp_ns for c in self.chunks)
        with self.cond:
            if not self.cond.wait_for(ready, timeout):
                return None
            if count is not None:
                return self.chunks[count - 1]
            return [c for c in self.chunks if conv.stamp_to_ns(c.header.stamp) == stamp_ns][0]

    def drive(self, t_ns: int, timeout: float = 5.0, retry: float = 0.5):
        """Publish an observation and wait for its chunk, re-sending lost messages."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.publish_obs(t_ns)
            chunk = self.wait_chunk(t_ns, timeout=min(retry, deadline - time.monotonic()))
            if chunk is not None:
                return chunk
        return None

    def call(self, srv_type, name: str, request, timeout: float = 10.0, probe=None):
        """Call a service; return its response, None when none came within ``timeout``.

        The request is re-sent every second until answered (see
        :mod:`sparse_policy_node.ros.services`), which suits idempotent services. For one
        that must run once (a lifecycle transition), pass ``probe``: a request without
        effect (a transition the current state refuses), re-sent until answered; then both
        directions are matched and ``request`` is sent once on the same client. Clients are
        kept per service. The timeout is long because a clean-clone CI run once saw neither
        a probe nor its re-sends answered within 3 s (cause not found); a call that is
        answered returns at once. Every call is measured (discovery wait, answer time,
        sends: :data:`sparse_policy_node.ros.services.CALL_LOG`; for a call that stalls,
        :func:`service_graph` at that moment); the test suite prints the distribution at
        the end of a run.
        """
        client = self._service_clients.get(name)
        if client is None:
            client = self._service_clients[name] = self.create_client(srv_type, name)

        def diagnose():
            return service_graph(self, name)
        if probe is None:
            return call_service(client, request, timeout, discovery_timeout=10.0,
                                diagnose=diagnose)
        if call_service(client, probe, timeout, discovery_timeout=10.0,
                        diagnose=diagnose) is None:
            return None
        return call_service(client, request, timeout, resend_s=None, diagnose=diagnose,
                            matched=True)  # the probe was answered on this client

    def latest_status(self, name: str, timeout: float = 3.0, newer_than: int = 0):
        """Wait for a diagnostics message and return the named status from it."""
        def ready():
            return len(self.diagnostics) > newer_than
        with self.cond:
            self.cond.wait_for(ready, timeout)
            for msg in reversed(self.diagnostics):
                for status in msg.status:
                    if status.name == name:
                        return status
        return None

    def wait_status(self, name: str, predicate, since: int, timeout: float = 3.0):
        """Wait for a status named ``name`` that satisfies ``predicate``; return it or None.

        Only diagnostics messages received after the first ``since`` count (pass
        ``diagnostics_received`` from before the event).
        """
        def match():
            new = min(self.diagnostics_received - since, len(self.diagnostics))
            for msg in self.diagnostics[len(self.diagnostics) - new:]:
                for status in msg.status:
                    if status.name == name and predicate(status):
                        return status
            return None
        with self.cond:
            self.cond.wait_for(lambda: match() is not None, timeout)
            return match()


def status_values(status) -> dict:
    """Return the KeyValue list of a DiagnosticStatus as a dict."""
    return {kv.key: kv.value for kv in status.values}
