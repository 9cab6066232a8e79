"""The bridge's real-time mode executes a late delta chunk's actions each once, in order.

A fake environment records every action; a stand-in policy answers the reset service and
publishes one chunk three steps after the observation it is stamped with.
"""

import threading
import time

from geometry_msgs.msg import PoseStamped
import numpy as np
import pytest
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros.sim_bridge_node import SimBridgeNode
from sparse_policy_node.ros.testing import Spinner
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

DT = 50_000_000  # 20 Hz


class RecordingEnv:
    """Stand-in simulator: constant observations, every action recorded."""

    def __init__(self, settings):
        self.size = tuple(settings.image_size)
        self.actions = []

    def obs(self):
        return {'agentview_image': np.zeros((3, *self.size), dtype=np.uint8),
                'robot0_eef_pos': np.zeros(3, np.float32),
                'robot0_eef_quat': np.array([0, 0, 0, 1], np.float32),
                'robot0_gripper_qpos': np.zeros(2, np.float32)}

    def reset(self, seed):
        return self.obs()

    def step(self, action):
        self.actions.append(np.asarray(action, dtype=float))
        return self.obs(), 0.0, False, {'success': False}


class LatePolicy(Node):
    """Answer ``policy_node/reset``; record the bridge's observation stamps."""

    def __init__(self, **kwargs):
        super().__init__('late_policy', **kwargs)
        self.stamps, self.cond = [], threading.Condition()
        self.create_service(Trigger, 'policy_node/reset', self._on_reset)
        self.create_subscription(PoseStamped, 'ee_pose', self._on_pose, qos_profile_sensor_data)
        self.chunk_pub = self.create_publisher(JointTrajectory, 'policy_node/action_chunk', 10)

    def _on_reset(self, request, response):
        response.success = True
        return response

    def _on_pose(self, msg):
        with self.cond:
            self.stamps.append(conv.stamp_to_ns(msg.header.stamp))
            self.cond.notify_all()


def test_realtime_bridge_executes_a_late_delta_chunk_without_dropping_actions(context):
    sim = SimBridgeNode(env_factory=RecordingEnv, context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in {
            'episodes': 1, 'max_episode_steps': 24, 'image_size': [16, 16], 'lockstep': False,
            'terminate_on_success': False}.items()])
    policy = LatePolicy(context=context)
    chunk = np.zeros((4, 7))
    chunk[:, 0] = [0.1, 0.2, 0.3, 0.4]          # four distinct deltas
    chunk[:, 6] = 1.0
    with Spinner(context, sim, policy):
        with policy.cond:
            assert policy.cond.wait_for(lambda: policy.stamps, 20.0)
            first = policy.stamps[0]             # the episode's first observation
            assert policy.cond.wait_for(lambda: len(policy.stamps) >= 4, 5.0)
        # Three steps have run (holding still) since the observation the chunk is for.
        policy.chunk_pub.publish(conv.chunk_to_trajectory(
            chunk, [f'a{i}' for i in range(7)], DT, conv.ns_to_stamp(first)))
        deadline = time.monotonic() + 10.0
        while not sim.finished.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sim.finished.done()
        summary = sim.close()
    policy.destroy_node()
    sim.destroy_node()
    done = np.array(sim.env.actions)
    moved = done[np.any(done[:, :6] != 0, axis=1)]
    # Every delta once, in order; rounding the elapsed time skipped the first three.
    assert np.allclose(moved[:, 0], chunk[:, 0]), done[:, 0]
    assert summary['chunks'] == 1 and summary['startup_underruns'] >= 3
    # The delay the world saw: at least the three steps that ran before it was published.
    (delay, count), = summary['arrival_delay_steps'].items()
    assert int(delay) >= 3 and count == 1
    # Smoothness of what ran: three steps of 0.1 within the chunk; holds are in neither set.
    smooth = summary['smoothness']
    assert smooth['da_within_mean'] == pytest.approx(0.1)
    assert smooth['da_within_max'] == pytest.approx(0.1)
    assert smooth['d2a_within_mean'] == pytest.approx(0.0, abs=1e-12)
    assert smooth['da_boundary_mean'] is None
