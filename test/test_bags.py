"""rosbag2 files (rosbags, no ROS graph): writing, reading, and bags -> demonstrations."""

import json

import h5py
import numpy as np
import pytest
from sparse_policy_node.bags.demos import BagLayout
from sparse_policy_node.bags.demos import bags_to_dataset
from sparse_policy_node.bags.demos import episode_from_bag
from sparse_policy_node.bags.rosbag_io import BagError
from sparse_policy_node.bags.rosbag_io import BagWriter
from sparse_policy_node.bags.rosbag_io import read_messages
from sparse_policy_node.bags.rosbag_io import TYPESTORE
from sparse_policy_node.cli import main

MS = 1_000_000
T = TYPESTORE.types
TOPICS = {'/cam/image_raw': 'sensor_msgs/msg/Image', '/ee_pose': 'geometry_msgs/msg/PoseStamped',
          '/joint_states': 'sensor_msgs/msg/JointState',
          '/teleop/command': 'std_msgs/msg/Float64MultiArray'}
LAYOUT = BagLayout(
    cameras={'agentview': 'cam/image_raw'},
    lowdim_map=('robot0_eef_pos=pose:ee_pose:position',
                'robot0_eef_quat=pose:ee_pose:orientation',
                'robot0_gripper_qpos=joint_state:joint_states:position:f1,f2'),
    action_topic='teleop/command', rate_hz=20.0, image_size=(32, 32))


def header(t_ns):
    stamp = T['builtin_interfaces/msg/Time'](sec=t_ns // 10**9, nanosec=t_ns % 10**9)
    return T['std_msgs/msg/Header'](stamp=stamp, frame_id='')


def image(t_ns, value, encoding='bgr8'):
    data = np.full(40 * 48 * 3, value, dtype=np.uint8)
    return T['sensor_msgs/msg/Image'](header=header(t_ns), height=40, width=48,
                                      encoding=encoding, is_bigendian=0, step=48 * 3, data=data)


def pose(t_ns, x):
    P = T['geometry_msgs/msg/Point']
    Q = T['geometry_msgs/msg/Quaternion']
    return T['geometry_msgs/msg/PoseStamped'](
        header=header(t_ns), pose=T['geometry_msgs/msg/Pose'](
            position=P(x=x, y=0.0, z=1.0), orientation=Q(x=0.0, y=0.0, z=0.0, w=2.0)))


def joints(t_ns, v):
    empty = np.zeros(0)
    return T['sensor_msgs/msg/JointState'](header=header(t_ns), name=['f2', 'f1'],
                                           position=np.array([-v, v]), velocity=empty,
                                           effort=empty)


def command(values):
    layout = T['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0)
    return T['std_msgs/msg/Float64MultiArray'](layout=layout,
                                               data=np.asarray(values, dtype=np.float64))


def write_teleop_bag(path, seconds=1.0, camera_hz=15, pose_hz=50, command_hz=20, offset=0):
    """Streams at their own rates; values encode their time so sampling can be checked."""
    t0 = 10**12
    with BagWriter(str(path), TOPICS) as bag:
        events = []
        for i in range(int(seconds * camera_hz)):
            t = t0 + offset + i * 10**9 // camera_hz
            events.append((t, '/cam/image_raw', image(t, i % 256)))
        for i in range(int(seconds * pose_hz)):
            t = t0 + i * 10**9 // pose_hz
            events.append((t, '/ee_pose', pose(t, i / 1000)))
            events.append((t, '/joint_states', joints(t, i / 1000)))
        for i in range(int(seconds * command_hz)):
            t = t0 + 3 * MS + i * 10**9 // command_hz
            events.append((t, '/teleop/command', command([i] + [0.0] * 6)))
        for t, topic, msg in sorted(events, key=lambda e: e[0]):
            bag.write(topic, t, msg)
    return t0


def test_bag_round_trip_keeps_topics_types_and_order(tmp_path):
    write_teleop_bag(tmp_path / 'bag')
    messages = list(read_messages(str(tmp_path / 'bag'), ['ee_pose']))
    assert len(messages) == 50 and {m[0] for m in messages} == {'/ee_pose'}
    times = [t for _, t, _ in messages]
    assert times == sorted(times)
    assert messages[3][2].pose.position.x == pytest.approx(0.003)


def test_episode_sampling_is_zero_order_hold_with_the_command_in_force(tmp_path):
    t0 = write_teleop_bag(tmp_path / 'bag', offset=7 * MS)
    obs, actions = episode_from_bag(str(tmp_path / 'bag'), LAYOUT)
    start = t0 + 7 * MS  # the camera starts last
    ticks = start + np.arange(len(actions)) * 50 * MS
    assert ticks[-1] <= t0 + 3 * MS + 19 * 50 * MS < ticks[-1] + 50 * MS
    for k, t in enumerate(ticks):
        cam = (t - start) * 15 // 10**9  # newest camera frame at or before t_k
        assert obs[k]['agentview_image'].shape == (3, 32, 32)
        assert obs[k]['agentview_image'][0, 0, 0] == cam % 256
        pose_i = (t - t0) * 50 // 10**9
        np.testing.assert_allclose(obs[k]['robot0_eef_pos'], [pose_i / 1000, 0, 1], atol=1e-6)
        np.testing.assert_allclose(obs[k]['robot0_eef_quat'], [0, 0, 0, 1])  # normalized
        # named joints reordered: f1 = +v, f2 = -v
        np.testing.assert_allclose(obs[k]['robot0_gripper_qpos'],
                                   [pose_i / 1000, -pose_i / 1000], atol=1e-6)
        # the command sent 3 ms after t_k answers observation k
        cmd = (t + 50 * MS - 1 - t0 - 3 * MS) * 20 // 10**9
        assert actions[k, 0] == cmd
    assert actions.shape == (len(obs), 7)


def test_dataset_from_bag_cli_writes_robomimic_demos(tmp_path, capsys):
    for i in range(2):
        write_teleop_bag(tmp_path / f'bag{i}', seconds=1.0 + i * 0.5)
    out = tmp_path / 'demos.hdf5'
    args = ['dataset-from-bag', str(tmp_path / 'bag0'), str(tmp_path / 'bag1'),
            '--out', str(out), '--rate', '20', '--image-size', '32', '32',
            '--camera', 'agentview=/cam/image_raw', '--action-topic', '/teleop/command']
    for entry in LAYOUT.lowdim_map:
        args += ['--lowdim', entry]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['demos'] == 2 and summary['action_dim'] == 7
    with h5py.File(out, 'r') as f:
        demo = f['data/demo_1']
        assert demo['obs/agentview_image'].shape == (summary['steps'][1], 32, 32, 3)
        assert demo['actions'].shape == (summary['steps'][1], 7)
        assert json.loads(f['data'].attrs['env_args'])['source'] == 'rosbag'


def test_missing_topic_and_bad_messages_are_clear_errors(tmp_path):
    write_teleop_bag(tmp_path / 'bag')
    layout = BagLayout(cameras={'agentview': '/wrist/image_raw'}, lowdim_map=(),
                       action_topic='/teleop/command')
    with pytest.raises(BagError, match="no topic.*'/wrist/image_raw'"):
        episode_from_bag(str(tmp_path / 'bag'), layout)
    with BagWriter(str(tmp_path / 'bad'), TOPICS) as bag:
        bag.write('/cam/image_raw', 1, image(1, 0, encoding='16UC1'))
        bag.write('/teleop/command', 2, command([0.0]))
    layout = BagLayout(cameras={'agentview': '/cam/image_raw'}, lowdim_map=(),
                       action_topic='/teleop/command')
    with pytest.raises(BagError, match='cam/image_raw.*encoding'):
        episode_from_bag(str(tmp_path / 'bad'), layout)
    with pytest.raises(BagError, match='does not exist'):
        episode_from_bag(str(tmp_path / 'nope'), layout)
    with pytest.raises(BagError, match='already exists'):
        BagWriter(str(tmp_path / 'bad'), TOPICS)


def test_cli_removes_a_half_written_dataset(tmp_path):
    write_teleop_bag(tmp_path / 'bag')
    out = tmp_path / 'demos.hdf5'
    with pytest.raises(SystemExit, match='no topic'):
        main(['dataset-from-bag', str(tmp_path / 'bag'), '--out', str(out),
              '--camera', 'agentview=/nope', '--action-topic', '/teleop/command'])
    assert not out.exists()


def test_bags_to_dataset_rejects_changing_action_dims(tmp_path):
    write_teleop_bag(tmp_path / 'a')
    with BagWriter(str(tmp_path / 'b'), TOPICS) as bag:
        for i in range(5):
            bag.write('/cam/image_raw', i * 50 * MS, image(i * 50 * MS, 0))
            bag.write('/teleop/command', i * 50 * MS + 1, command([0.0, 1.0]))
    layout = BagLayout(cameras={'agentview': '/cam/image_raw'}, lowdim_map=(),
                       action_topic='/teleop/command')
    with pytest.raises(BagError, match='action dimension 2'):
        bags_to_dataset([str(tmp_path / 'a'), str(tmp_path / 'b')], str(tmp_path / 'o.hdf5'),
                        layout)
