"""Policy node behaviour and robustness with real rclpy nodes (tiny random-weight model)."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros.policy_node import PolicyNode
from sparse_policy_node.ros.testing import FakeRobot
from sparse_policy_node.ros.testing import isolate_ros
from sparse_policy_node.ros.testing import save_tiny_model
from sparse_policy_node.ros.testing import Spinner
from sparse_policy_node.ros.testing import status_values
from sparse_policy_node.ros.testing import TINY_PARAMS
from std_srvs.srv import Trigger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DT = 50_000_000  # 20 Hz


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp('model')))


@pytest.fixture
def system(context, model_dir):
    """Start a policy node and a fake robot; yield a factory taking parameter overrides."""
    started = []

    def start(**overrides):
        values = dict(TINY_PARAMS, model_dir=model_dir, diagnostics_period_s=0.2, **overrides)
        node = PolicyNode(context=context, parameter_overrides=[
            Parameter(k, value=v) for k, v in values.items()])
        robot = FakeRobot(context=context)
        spinner = Spinner(context, node, robot).__enter__()
        started.append((spinner, node))
        time.sleep(0.3)  # discovery
        return node, robot

    yield start
    for spinner, node in started:
        spinner.__exit__()
        node.close()


def now_ns():
    return time.time_ns() // DT * DT


def steps(robot, t0, n, **kw):
    for i in range(n):
        robot.publish_obs(t0 + i * DT, **kw)
        time.sleep(0.005)


def test_chunk_is_stamped_named_timed_and_clamped(system):
    node, robot = system(**{'action.upper': [0.05]})
    t0 = now_ns()
    chunk = robot.drive(t0)
    assert chunk is not None
    assert chunk.joint_names == ['dx', 'dy', 'dz', 'dax', 'day', 'daz', 'gripper']
    assert len(chunk.points) == 4  # the model's n_action_steps
    assert [conv.stamp_to_ns(p.time_from_start) for p in chunk.points] == [0, DT, 2 * DT, 3 * DT]
    values = np.array([p.positions for p in chunk.points])
    assert np.isfinite(values).all() and values.max() <= 0.05 and values.min() >= -1.0
    deadline = time.monotonic() + 2.0
    while not robot.next_actions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert robot.next_actions and len(robot.next_actions[0]) == 7


def test_replans_once_per_execution_horizon_and_horizon_is_dynamic(system):
    node, robot = system()
    t0 = now_ns()
    assert robot.drive(t0) is not None
    steps(robot, t0 + DT, 8)
    assert robot.wait_chunk(t0 + 8 * DT, timeout=3.0) is not None
    assert [conv.stamp_to_ns(c.header.stamp) - t0 for c in robot.chunks] == [0, 4 * DT, 8 * DT]
    assert node.set_parameters([Parameter('execution_horizon', value=2)])[0].successful
    steps(robot, t0 + 9 * DT, 4)
    chunk = robot.wait_chunk(t0 + 12 * DT, timeout=3.0)
    assert chunk is not None and len(chunk.points) == 2
    steps(robot, t0 + 13 * DT, 2)
    assert robot.wait_chunk(t0 + 14 * DT, timeout=3.0) is not None


def test_bad_images_are_rejected_and_the_node_recovers(system):
    node, robot = system()
    t0 = now_ns()
    bad = [Image(height=32, width=32, encoding='16UC1', step=64, data=bytes(2048)),
           Image(height=32, width=32, encoding='rgb8', step=96, data=bytes(100)),
           Image(height=32, width=32, encoding='rgb8', step=96, data=b''),
           Image(height=0, width=0, encoding='rgb8', step=0, data=b'')]
    for i, msg in enumerate(bad):
        robot.publish_image(t0 + i * DT, image=msg)
        robot.publish_joints(t0 + i * DT)
        robot.publish_pose(t0 + i * DT)
    time.sleep(0.5)
    assert not robot.chunks
    assert node.stats.counters['rejected_agentview_image'] == 4
    # Other sizes and encodings are converted, not rejected.
    odd = conv.rgb_to_image(np.zeros((48, 64, 3), dtype=np.uint8), 'bgr8')
    robot.publish_obs(t0 + 9 * DT)  # the window also needs the previous step
    robot.publish_image(t0 + 10 * DT, image=odd)
    robot.publish_joints(t0 + 10 * DT)
    robot.publish_pose(t0 + 10 * DT)
    assert robot.wait_chunk(t0 + 10 * DT) is not None
    robot.publish_image(t0 + 11 * DT, encoding='mono8')
    assert node.stats.counters['rejected_agentview_image'] == 4


def test_bad_proprioception_is_rejected(system):
    node, robot = system()
    t0 = now_ns()
    robot.publish_image(t0)
    robot.publish_pose(t0, position=(float('nan'), 0.0, 1.0))
    robot.publish_joints(t0, position=(0.01, float('inf')))
    robot.publish_joints(t0 + DT, position=(0.01,))                       # wrong length
    robot.publish_joints(t0 + 2 * DT, names=['other_joint', 'x'])         # missing names
    time.sleep(0.5)
    assert not robot.chunks
    counts = node.stats.counters
    assert counts['rejected_robot0_eef_pos'] == 1 and counts['rejected_robot0_eef_quat'] == 0
    assert counts['rejected_robot0_gripper_qpos'] == 3
    robot.publish_obs(t0 + 3 * DT)  # good inputs again: a chunk once a whole window is good
    assert robot.drive(t0 + 4 * DT) is not None


def test_out_of_order_unstamped_and_stale_inputs(system):
    node, robot = system(max_obs_age_s=0.5)
    t0 = now_ns()
    assert robot.drive(t0) is not None
    robot.publish_obs(t0 - DT)                                  # out of order: dropped
    robot.publish_obs(0)                                        # unstamped: rejected
    time.sleep(0.3)
    assert node.stats.counters['dropped_out_of_order'] == 4    # image, joints, pos, quat
    assert node.stats.counters['rejected_agentview_image'] == 1
    assert robot.call(Trigger, 'policy_node/reset', Trigger.Request()) is not None
    old = now_ns() - 2_000_000_000                              # 2 s old: stale
    robot.publish_obs(old)
    time.sleep(0.4)
    assert robot.wait_chunk(old, timeout=0.2) is None
    assert node.stats.counters['stale_skips'] == 1
    t1 = now_ns() + DT
    robot.publish_obs(t1 - DT)
    assert robot.drive(t1) is not None                          # fresh input: back to work


def test_camera_stops_then_resumes(system):
    node, robot = system(max_obs_age_s=0.3)
    t0 = now_ns()
    assert robot.drive(t0) is not None
    n_chunks = len(robot.chunks)
    t = t0
    for _ in range(16):                                         # 0.8 s without the camera
        t += DT
        robot.publish_obs(t, camera=False)
        time.sleep(0.05)
    assert len(robot.chunks) == n_chunks
    status = robot.latest_status('policy_node: inputs', newer_than=len(robot.diagnostics))
    assert status is not None and status.level == b'\x01'
    assert 'agentview_image' in status.message
    assert float(status_values(status)['age_s.agentview_image']) > 0.3
    t = now_ns()
    robot.publish_obs(t - DT)
    assert robot.drive(t) is not None                           # resumes by itself
    for _ in range(8):
        t += DT
        robot.publish_obs(t)
        time.sleep(0.05)
    status = robot.latest_status('policy_node: inputs', newer_than=len(robot.diagnostics))
    assert status.level == b'\x00', status.message


def test_invalid_parameters_are_rejected_with_a_reason(system):
    node, robot = system()
    cases = {'sampler.steps': (50, 'num_train_timesteps'),
             'sparsity.gate_source': ('pruner', 'no pruner'),
             'execution_horizon': (5, 'n_action_steps=4'),
             'replan_lead_steps': (4, 'below the execution horizon'),
             'device': ('cuda:7', 'device'),
             'model_dir': ('/does/not/exist', 'does not exist'),
             'action.upper': ([1.0, 2.0], '1 or 7'),
             'control_rate_hz': (10.0, 'read-only')}
    for name, (value, reason) in cases.items():
        result = node.set_parameters([Parameter(name, value=value)])[0]
        assert not result.successful, name
        assert reason in result.reason, (name, result.reason)
    t0 = now_ns()
    assert robot.drive(t0) is not None
    assert node.set_parameters([Parameter('sparsity.target', value=0.8)])[0].successful
    steps(robot, t0 + DT, 4)
    assert robot.wait_chunk(t0 + 4 * DT) is not None
    assert abs(node.stats.sparsity[-1] - 0.8) < 0.05          # applied from the next chunk


def test_reset_while_a_chunk_is_in_flight(system):
    node, robot = system()
    in_flight, release = threading.Event(), threading.Event()
    predict = node.engine.predict_action

    def slow_predict(obs, **kwargs):
        in_flight.set()
        release.wait(5.0)
        return predict(obs, **kwargs)

    node.engine.predict_action = slow_predict
    t0 = now_ns()
    robot.publish_obs(t0)
    assert in_flight.wait(3.0)
    response = robot.call(Trigger, 'policy_node/reset', Trigger.Request())
    assert response is not None and response.success
    release.set()
    time.sleep(0.3)
    assert not robot.chunks                                      # old episode: discarded
    assert node.stats.counters['discarded_after_reset'] == 1
    node.engine.predict_action = predict
    t1 = now_ns() + DT
    assert robot.drive(t1) is not None
    assert node.stats.counters['dense_chunks'] == 1              # first chunk of the episode


def test_time_jump_backwards_starts_a_new_episode(system):
    node, robot = system(max_obs_age_s=30.0)
    t0 = now_ns()
    assert robot.drive(t0) is not None
    steps(robot, t0 + DT, 4)
    assert robot.wait_chunk(t0 + 4 * DT) is not None
    back = t0 - 10_000_000_000                                   # bag loop / sim restart
    assert robot.drive(back) is not None
    assert node.stats.counters['resets'] == 1
    assert node.stats.counters['dense_chunks'] == 2


def test_diagnostics_report_latency_rate_sparsity(system):
    node, robot = system()
    t0 = now_ns()
    assert robot.drive(t0) is not None
    for k in range(1, 4):
        steps(robot, t0 + (4 * k - 3) * DT, 4)
        assert robot.wait_chunk(t0 + 4 * k * DT) is not None
    status = robot.latest_status('policy_node: inference', newer_than=len(robot.diagnostics))
    values = status_values(status)
    for key in ('latency_p50_ms', 'latency_p99_ms', 'obs_to_chunk_p99_ms', 'chunk_rate_hz',
                'realized_sparsity', 'chunks', 'dense_chunks', 'steps', 'device'):
        assert key in values, key
    assert float(values['latency_p50_ms']) > 0 and values['chunks'] == '4'


@pytest.mark.parametrize('defect, message', [
    ('missing', 'does not exist'), ('json', 'not valid JSON'),
    ('weights', 'not a readable safetensors file')])
def test_bad_model_directory_exits_nonzero_with_a_clear_error(tmp_path, model_dir, defect,
                                                              message):
    broken = tmp_path / 'model'
    if defect != 'missing':
        broken.mkdir()
        for name in ('config.json', 'model.safetensors'):
            (broken / name).write_bytes(open(os.path.join(model_dir, name), 'rb').read())
        target = 'config.json' if defect == 'json' else 'model.safetensors'
        (broken / target).write_bytes(b'{"truncated')
    isolate_ros(str(tmp_path / 'log'))
    proc = subprocess.run(
        [sys.executable, '-m', 'sparse_policy_node.ros.policy_node', '--ros-args',
         '-p', f'model_dir:={broken}'], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1
    assert 'cannot start' in proc.stderr and message in proc.stderr, proc.stderr


def test_frames_are_encoded_on_arrival_and_reused_by_chunks(system):
    node, robot = system(max_obs_age_s=30.0, execution_horizon=1)  # replan every step
    key = node.image_keys[0]
    t0 = now_ns()
    robot.publish_image(t0)  # an image alone: no complete window, so no chunk needs it yet
    deadline = time.monotonic() + 3.0
    while node.engine.frames.get(key, (node._episode, t0)) is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node.engine.frames.get(key, (node._episode, t0)) is not None
    assert not robot.chunks
    n = 6
    for i in range(n):
        assert robot.drive(t0 + i * DT) is not None
    # Older frames of a window always come from the cache; the newest one comes from the
    # frame encoder unless the chunk started first (then the chunk encodes it, once).
    assert node.stats.counters['chunks'] == n
    assert node.stats.counters['frames_encoded_in_chunks'] <= n - 1


def test_with_encode_on_arrival_off_each_frame_is_encoded_once_by_the_chunks(system):
    node, robot = system(encode_on_arrival=False, max_obs_age_s=30.0, execution_horizon=1)
    t0 = now_ns()
    n = 6
    for i in range(n):
        assert robot.drive(t0 + i * DT) is not None
    # The first window repeats the first frame (episode start): one frame; then one new
    # frame per chunk. Without the frame cache it would be T_o per chunk.
    assert node.stats.counters['chunks'] == n
    assert node.stats.counters['frames_encoded_in_chunks'] == n


def test_replan_lead_starts_the_next_chunk_early(system):
    node, robot = system(replan_lead_steps=1, max_obs_age_s=30.0)
    t0 = now_ns()
    assert robot.drive(t0) is not None
    steps(robot, t0 + DT, 3)  # the 4-action chunk runs out after t0 + 3 DT
    # Without a lead the next chunk would be computed from the observation at t0 + 4 DT.
    assert robot.wait_chunk(t0 + 3 * DT) is not None
    assert [conv.stamp_to_ns(c.header.stamp) for c in robot.chunks] == [t0, t0 + 3 * DT]


def test_lifecycle_configure_activate_deactivate_cleanup(system, model_dir):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    node, robot = system(autostart=False, max_obs_age_s=30.0)
    assert node.engine is None                                   # unconfigured: nothing loaded
    assert node.set_parameters([Parameter('model_dir', value='/does/not/exist')])[0].successful
    node.trigger_configure()
    assert node.engine is None and 'does not exist' in str(node._configure_error)
    node.set_parameters([Parameter('model_dir', value=model_dir)])
    node.trigger_configure()
    assert node.engine is not None and node._configure_error is None
    time.sleep(0.3)  # discovery of the new topics
    t0 = now_ns()
    robot.publish_obs(t0)
    assert robot.wait_chunk(t0, timeout=1.0) is None             # configured, not active
    node.trigger_activate()
    assert robot.drive(t0 + DT) is not None
    response = robot.call(ChangeState, 'policy_node/change_state', ChangeState.Request(
        transition=Transition(id=Transition.TRANSITION_DEACTIVATE)))
    assert response is not None and response.success
    chunks = len(robot.chunks)
    steps(robot, t0 + 2 * DT, 6)
    time.sleep(0.5)
    assert len(robot.chunks) == chunks                           # inactive: robot holds
    status = robot.latest_status('policy_node: inference', newer_than=len(robot.diagnostics))
    assert status.message == 'inactive: no chunks'
    dense = node.stats.counters['dense_chunks']
    node.trigger_activate()                                      # a new episode: dense first
    assert robot.drive(now_ns() + DT) is not None
    assert node.stats.counters['dense_chunks'] == dense + 1
    node.trigger_deactivate()
    node.trigger_cleanup()
    assert node.engine is None and not node._threads
