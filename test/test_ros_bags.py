"""Bring your own demonstrations, end to end on a live ROS graph.

A robot driver (the tests' FakeRobot) and a teleoperator publish; the bag recorder writes a
rosbag2; ``dataset-from-bag`` turns it into demos; a few training steps make a model
directory; the policy node serves it.
"""

import os
import subprocess
import sys
import time

import numpy as np
from rclpy.node import Node
from rclpy.parameter import Parameter
from sparse_policy_node.bags.demos import BagLayout
from sparse_policy_node.bags.demos import bags_to_dataset
from sparse_policy_node.bags.recorder import BagRecorder
from sparse_policy_node.bags.recorder import NODE_TOPICS
from sparse_policy_node.bags.rosbag_io import bag_topics
from sparse_policy_node.ros.policy_node import PolicyNode
from sparse_policy_node.ros.testing import FakeRobot
from sparse_policy_node.ros.testing import FINGERS
from sparse_policy_node.ros.testing import Spinner
from sparse_policy_node.ros.testing import TINY_PARAMS
from sparse_policy_node.training.config import TrainConfig
from sparse_policy_node.training.train_policy import train
from std_msgs.msg import Float64MultiArray

TOPICS = {'/agentview/image_raw': 'sensor_msgs/msg/Image',
          '/joint_states': 'sensor_msgs/msg/JointState',
          '/ee_pose': 'geometry_msgs/msg/PoseStamped',
          '/teleop/command': 'std_msgs/msg/Float64MultiArray'}
LAYOUT = BagLayout(
    cameras={'agentview': '/agentview/image_raw'},
    lowdim_map=('robot0_eef_pos=pose:ee_pose:position',
                'robot0_eef_quat=pose:ee_pose:orientation',
                f'robot0_gripper_qpos=joint_state:joint_states:position:{",".join(FINGERS)}'),
    action_topic='/teleop/command', rate_hz=20.0, image_size=(32, 32))


def record_teleop(context, path, steps=40):
    """Publish ``steps`` observation + command steps 50 ms apart while recording them."""
    recorder = BagRecorder(str(path), TOPICS, context=context)
    robot = FakeRobot(context=context)
    teleop = Node('teleop', context=context)
    command = teleop.create_publisher(Float64MultiArray, '/teleop/command', 10)
    with Spinner(context, recorder, robot, teleop):
        time.sleep(0.5)  # discovery
        for i in range(steps):
            robot.publish_obs(time.time_ns())
            command.publish(Float64MultiArray(data=[float(np.sin(i / 5))] * 6 + [1.0]))
            time.sleep(0.05)
        time.sleep(0.2)
    count = recorder.close()
    robot.destroy_node()
    teleop.destroy_node()
    return count


def test_recorded_teleop_becomes_a_model_the_node_serves(context, tmp_path):
    bag = tmp_path / 'teleop_bag'
    count = record_teleop(context, bag)
    assert count > 40 * 4 // 2  # best effort on localhost: nearly all of the 160 messages
    assert bag_topics(str(bag)) == TOPICS
    summary = bags_to_dataset([str(bag)], str(tmp_path / 'demos.hdf5'), LAYOUT)
    assert summary['demos'] == 1 and summary['action_dim'] == 7
    assert summary['steps'][0] >= 20

    cfg = TrainConfig(dataset=str(tmp_path / 'demos.hdf5'), out_dir=str(tmp_path / 'run'),
                      preset='tiny', batch_size=4, max_steps=2, warmup_steps=1,
                      checkpoint_every=2, log_every=1, threads=1, device='cpu')
    model_dir = train(cfg, progress=False)['model_dir']

    params = dict(TINY_PARAMS, model_dir=model_dir, max_future_stamp_s=2.0)
    node = PolicyNode(context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in params.items()])
    robot = FakeRobot(context=context)
    try:
        with Spinner(context, node, robot):
            time.sleep(0.3)
            t = time.time_ns() // 50_000_000 * 50_000_000
            robot.publish_obs(t - 50_000_000)
            # The chunk of t - 50 ms may already cover t (then none is stamped t).
            chunk = robot.drive(t, timeout=10.0) or robot.wait_chunk(count=1, timeout=1.0)
    finally:
        summary = node.close()
        robot.destroy_node()
    assert chunk is not None and len(chunk.points) > 0, summary
    assert all(np.isfinite(p.positions).all() for p in chunk.points)


def test_recorder_default_topics_are_the_node_interface():
    assert '/policy_node/action_chunk' in NODE_TOPICS and '/ee_pose' in NODE_TOPICS


def test_record_bag_command_writes_a_readable_bag(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), 'sparse-policy')
    out = tmp_path / 'bag'
    done = subprocess.run([exe, 'record-bag', str(out), '--duration', '0.5', '--topic',
                           '/teleop/command:std_msgs/msg/Float64MultiArray'],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'wrote 0 messages' in done.stdout
    assert bag_topics(str(out)) == {'/teleop/command': 'std_msgs/msg/Float64MultiArray'}
    again = subprocess.run([exe, 'record-bag', str(out), '--duration', '0.1'],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and 'already exists' in again.stderr
