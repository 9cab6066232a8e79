"""Record topics to a rosbag2 file from a running ROS graph (rclpy, no ``ros2 bag`` needed).

Subscriptions take the serialized CDR bytes (``raw=True``), so messages go to the bag without
a round trip through Python objects; each is stamped with the node clock at arrival (sim time
under ``use_sim_time``), like ``ros2 bag record``'s receive time. Subscriptions are best
effort, which matches reliable and sensor-data publishers alike.
"""

import importlib
import threading
from typing import Dict

from rclpy.node import Node
from rclpy.qos import QoSProfile
from rclpy.qos import ReliabilityPolicy
from sparse_policy_node.bags.rosbag_io import BagWriter
from sparse_policy_node.bags.rosbag_io import full_type

# The policy node's inputs and outputs with the robosuite bridge (default recording set),
# the object state of state-only tasks (can) and the bridge's episode ends (replay-bag
# resets the node there, as the bridge did).
NODE_TOPICS = {
    '/agentview/image_raw': 'sensor_msgs/msg/Image',
    '/joint_states': 'sensor_msgs/msg/JointState',
    '/ee_pose': 'geometry_msgs/msg/PoseStamped',
    '/object_state': 'sensor_msgs/msg/JointState',
    '/policy_node/action_chunk': 'trajectory_msgs/msg/JointTrajectory',
    '/policy_node/next_action': 'sensor_msgs/msg/JointState',
    '/sim_bridge/episode_result': 'diagnostic_msgs/msg/DiagnosticStatus',
}


def message_class(msgtype: str):
    """``sensor_msgs/msg/Image`` -> the rclpy message class."""
    package, _, name = full_type(msgtype).split('/')
    return getattr(importlib.import_module(f'{package}.msg'), name)


class BagRecorder(Node):
    """Write every message of ``topics`` ({name: type}) to a new bag at ``path``."""

    def __init__(self, path: str, topics: Dict[str, str], storage: str = 'mcap', **kwargs):
        super().__init__('bag_recorder', **kwargs)
        self.bag = BagWriter(path, topics, storage)
        self._lock = threading.Lock()
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)
        for topic, msgtype in topics.items():
            self.create_subscription(message_class(msgtype), topic,
                                     lambda data, t=topic: self._on_message(t, data), qos,
                                     raw=True)

    def _on_message(self, topic: str, data: bytes) -> None:
        t_ns = self.get_clock().now().nanoseconds
        with self._lock:
            if self.bag is not None:
                self.bag.write_raw(topic, t_ns, data)

    @property
    def count(self) -> int:
        """Messages written so far."""
        return self.bag.count if self.bag is not None else 0

    def close(self) -> int:
        """Finish the bag and destroy the node; return the number of messages written."""
        with self._lock:
            count = self.bag.count if self.bag is not None else 0
            if self.bag is not None:
                self.bag.close()
                self.bag = None
        self.destroy_node()
        return count
