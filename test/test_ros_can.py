"""``task:=can``: a state-only (low-dim) model served with the bridge's object state.

The bridge renders nothing (``cameras: ['']``) and publishes robosuite's object-state as
``object_state`` (JointState object_0..13); the policy node serves a model without cameras
from the pose, gripper and object topics. The end-to-end test runs the rclpy bring-up with
the real robosuite PickPlaceCan and a tiny low-dim model made here (models/can is trained
and shipped separately).
"""

import os
import subprocess
import sys
import time

from builtin_interfaces.msg import Time
import numpy as np
import pytest
from rclpy.parameter import Parameter
from sensor_msgs.msg import JointState
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros import launch_args as la
from sparse_policy_node.ros import params
from sparse_policy_node.ros.policy_node import PolicyNode
from sparse_policy_node.ros.sim_bridge_node import object_state_msg
from sparse_policy_node.ros.sim_bridge_node import robosuite_env
from sparse_policy_node.ros.testing import FakeRobot
from sparse_policy_node.ros.testing import isolate_ros
from sparse_policy_node.ros.testing import Spinner
from sparse_policy_node.ros.testing import TINY_PARAMS
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAN_LOWDIM = (('robot0_eef_pos', 3), ('robot0_eef_quat', 4), ('robot0_gripper_qpos', 2),
              ('object', 14))


def save_tiny_lowdim_model(directory: str) -> str:
    """Save a seeded random-weight state-only policy with the can model's inputs."""
    import torch
    from sparse_policy_node.core.checkpoint import save_policy
    from sparse_policy_node.core.config import ObsConfig
    from sparse_policy_node.core.config import tiny_config
    from sparse_policy_node.core.config import VisionConfig
    from sparse_policy_node.core.policy import DiffusionPolicy
    cfg = tiny_config()
    cfg.obs = ObsConfig(vision=VisionConfig(cameras=()), lowdim=CAN_LOWDIM)
    torch.manual_seed(0)
    save_policy(DiffusionPolicy(cfg), directory)
    return directory


def overlay(base: str, over: str) -> dict:
    """Parameters of ``config/base`` with ``config/over`` layered on top (as ROS does)."""
    values = {}
    for name in (base, over):
        with open(os.path.join(ROOT, 'config', name)) as f:
            values.update(yaml.safe_load(f)['/**']['ros__parameters'])
    return values


def test_can_overlays_use_declared_names_and_valid_values():
    policy = overlay('policy.yaml', 'policy_can.yaml')
    declared = {p.name: p for p in params.NODE_PARAMS}
    settings = params.NodeSettings(**{declared[k].attr: v for k, v in policy.items()
                                      if k in declared})
    assert settings.model_dir == 'models/can'
    sources = {s.key: s for s in conv.parse_lowdim_map(settings.lowdim_map)}
    assert {k: sources[k].dim for k in sources} == dict(CAN_LOWDIM)
    assert sources['object'].topic == 'object_state'
    assert sources['object'].names == tuple(f'object_{i}' for i in range(14))
    bridge = overlay('sim_bridge.yaml', 'sim_bridge_can.yaml')
    declared = {p.name: p for p in params.BRIDGE_PARAMS}
    assert set(bridge) == set(declared)
    settings = params.BridgeSettings(**{declared[k].attr: v for k, v in bridge.items()})
    assert settings.task == 'can' and settings.cameras == () and settings.publish_object_state


def test_bridge_settings_for_state_only_tasks():
    s = params.BridgeSettings()
    assert s.cameras == ('agentview',) and not s.publish_object_state
    assert s.object_state_topic == 'object_state'
    assert params.BridgeSettings(cameras=('',)).cameras == ()
    with pytest.raises(ConfigError, match='unique'):
        params.BridgeSettings(cameras=('agentview', 'agentview'))
    with pytest.raises(ConfigError, match='object_state_topic'):
        params.BridgeSettings(object_state_topic='')


def test_object_state_message_names_each_value():
    obs = {'object': np.arange(14, dtype=np.float32)}
    msg = object_state_msg(obs, Time(sec=3))
    assert msg.name == [f'object_{i}' for i in range(14)]
    assert msg.position.tolist() == list(range(14)) and msg.header.stamp.sec == 3
    with pytest.raises(ValueError, match='include_object'):
        object_state_msg({}, Time(sec=3))


def test_task_can_plans_the_overlays_and_needs_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # models/can is looked up in the working directory too
    share = tmp_path / 'share'
    with pytest.raises(ValueError, match='models/can, which is not installed'):
        la.plan_nodes(la.parse_launch_args(['task:=can']), str(share))
    (share / 'models' / 'can').mkdir(parents=True)
    policy, bridge = la.plan_nodes(la.parse_launch_args(['task:=can']), str(share))
    config = str(share / 'config')
    assert policy.params_files == [f'{config}/policy.yaml', f'{config}/policy_can.yaml']
    assert bridge.params_files == [f'{config}/sim_bridge.yaml',
                                   f'{config}/sim_bridge_can.yaml']
    assert bridge.overrides['task'] == 'can'
    # A model given explicitly needs nothing installed; a user's files get the overlay too.
    policy, bridge = la.plan_nodes(la.parse_launch_args(
        ['task:=can', 'model:=/m', 'params_file:=/p.yaml', 'bridge_params_file:=/b.yaml']),
        str(tmp_path / 'empty'))
    assert policy.overrides['model_dir'] == '/m'
    assert policy.params_files[0] == '/p.yaml' and policy.params_files[1].endswith(
        'policy_can.yaml')
    assert bridge.params_files[0] == '/b.yaml'
    lift = la.plan_nodes(la.parse_launch_args([]), str(share))
    assert [len(n.params_files) for n in lift] == [1, 1]
    robot = la.plan_nodes(la.parse_launch_args(['task:=can', 'sim:=none']), str(share))
    assert len(robot) == 1 and robot[0].params_files[-1].endswith('policy_can.yaml')


def test_policy_node_serves_a_model_without_cameras(context, tmp_path):
    """The node waits for no image and computes chunks from low-dim inputs only."""
    model = save_tiny_lowdim_model(str(tmp_path / 'model'))
    values = dict(TINY_PARAMS, model_dir=model, max_future_stamp_s=2.0,
                  lowdim_map=overlay('policy.yaml', 'policy_can.yaml')['lowdim_map'])
    node = PolicyNode(context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in values.items()])
    robot = FakeRobot(context=context)
    tracker = robot.create_publisher(JointState, 'object_state', 10)
    try:
        assert node.image_keys == [] and 'object' in node.keys
        with Spinner(context, node, robot):
            time.sleep(0.3)
            t = time.time_ns() // 50_000_000 * 50_000_000
            chunk = None
            for _ in range(20):
                msg = JointState(name=[f'object_{i}' for i in range(14)],
                                 position=[0.1 * i for i in range(14)])
                msg.header.stamp = conv.ns_to_stamp(t)
                tracker.publish(msg)
                robot.publish_obs(t, camera=False)
                chunk = robot.wait_chunk(t, timeout=0.5)
                if chunk is not None:
                    break
    finally:
        node.close()
        robot.destroy_node()
    assert chunk is not None and len(chunk.points) == 4
    assert all(np.isfinite(p.positions).all() for p in chunk.points)


def test_bringup_task_can_runs_robosuite_with_a_state_only_model(tmp_path):
    """The bring-up runs a PickPlaceCan episode; the bridge's object state feeds the policy.

    The policy node is the subscriber of ``object_state``: it builds an observation window
    only when every input has arrived, so with a state-only model each chunk (and, in
    lockstep, each step of the episode) needs object states named ``object_0..13`` to have
    reached it. The message content is checked here in-process, from the bridge's own
    environment and message builder: no listener races the episode for discovery.
    """
    pytest.importorskip('robosuite')
    isolate_ros(str(tmp_path / 'log'))
    env = dict(os.environ, PYTHONPATH=ROOT, MUJOCO_GL='egl')
    model = save_tiny_lowdim_model(str(tmp_path / 'model'))
    bridge = tmp_path / 'bridge.yaml'
    with open(os.path.join(ROOT, 'config', 'sim_bridge.yaml')) as f:
        data = yaml.safe_load(f)
    data['/**']['ros__parameters'].update(max_episode_steps=12)
    bridge.write_text(yaml.safe_dump(data))
    done = subprocess.run(
        [sys.executable, '-m', 'sparse_policy_node.cli', 'launch', 'task:=can',
         f'model:={model}', 'episodes:=1', f'bridge_params_file:={bridge}',
         f'summary_dir:={tmp_path}'],
        env=env, capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert 'can: 1 episodes' in out
    summary = yaml.safe_load((tmp_path / 'sim_bridge.json').read_text())
    assert summary['task'] == 'can' and [r['length'] for r in summary['results']] == [12]
    policy = yaml.safe_load((tmp_path / 'policy_node.json').read_text())
    assert policy['chunks'] >= 3 and policy['dense_chunks'] == 1
    # Each chunk's window held object states (the node waits for every input), and none
    # was refused (names other than object_0..13, unstamped, ahead of the clock).
    assert 'rejected_object' not in policy, policy
    assert "inputs ['robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos', 'object']" \
        in out
    names, values = bridge_object_state(overlay('sim_bridge.yaml', 'sim_bridge_can.yaml'))
    assert names == [f'object_{i}' for i in range(14)]
    assert np.isfinite(values).all() and np.abs(values).max() > 0


def bridge_object_state(values: dict):
    """Names and values of the bridge's object_state message after a reset and one step.

    Built as the bridge builds it (its environment factory and ``object_state_msg``) from
    the real robosuite PickPlaceCan, without DDS.
    """
    declared = {p.name: p for p in params.BRIDGE_PARAMS}
    settings = params.BridgeSettings(**{declared[k].attr: v for k, v in values.items()})
    sim = robosuite_env(settings)
    try:
        obs = sim.reset(settings.seed)
        msgs = [object_state_msg(obs, Time(sec=1))]
        obs, _, _, _ = sim.step(np.zeros(7))
        msgs.append(object_state_msg(obs, Time(sec=1, nanosec=50_000_000)))
    finally:
        sim.close()
    assert msgs[0].name == msgs[1].name
    return list(msgs[0].name), np.array([m.position for m in msgs])


def test_launch_file_starts_the_planned_can_nodes(monkeypatch, tmp_path):
    """``ros2 launch ... task:=can`` runs the same plan (overlays included) as the bring-up."""
    from test_ros_launch import load_launch_file
    monkeypatch.chdir(tmp_path)
    share = tmp_path / 'share'
    (share / 'models' / 'can').mkdir(parents=True)
    description = load_launch_file(monkeypatch, str(share))
    opaque = [e for e in description.args[0] if 'function' in e.kwargs][0]
    values = la.parse_launch_args(['task:=can', 'episodes:=3'])
    nodes = opaque.kwargs['function'](values)
    plan = la.plan_nodes(values, str(share))
    assert [n.kwargs['parameters'] for n in nodes] == [p.params_files + [p.overrides]
                                                       for p in plan]
    assert nodes[1].kwargs['parameters'][1].endswith('config/sim_bridge_can.yaml')
