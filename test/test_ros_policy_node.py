"""Policy node behaviour and robustness with real rclpy nodes (tiny random-weight model)."""

import os
import signal
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


def refused_transition():
    """Return a ChangeState request an active node refuses without effect (configure)."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    return ChangeState.Request(transition=Transition(id=Transition.TRANSITION_CONFIGURE))


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp('model')))


@pytest.fixture
def system(context, model_dir):
    """Start a policy node and a fake robot; yield a factory taking parameter overrides."""
    started = []

    def start(namespace='', **overrides):
        # The fake robot runs ahead of real time (steps published 5 ms apart, stamped
        # 50 ms apart): allow stamps up to 2 s ahead unless a test says otherwise.
        values = dict(TINY_PARAMS, model_dir=model_dir, diagnostics_period_s=0.2,
                      max_future_stamp_s=2.0)
        values.update(overrides)
        node = PolicyNode(context=context, namespace=namespace, parameter_overrides=[
            Parameter(k, value=v) for k, v in values.items()])
        robot = FakeRobot(context=context, namespace=namespace)
        spinner = Spinner(context, node, robot).__enter__()
        started.append((spinner, node, robot))
        time.sleep(0.3)  # discovery
        return node, robot

    yield start
    for spinner, node, robot in started:
        spinner.__exit__()
        node.close()
        node.destroy_node()
        robot.destroy_node()


class Logs:
    """The node's log lines, read from the test's stderr (rcutils writes them there)."""

    def __init__(self, capfd):
        self.capfd, self.text = capfd, ''

    def wait(self, text: str, timeout: float = 3.0, start: int = 0) -> bool:
        """Wait until ``text`` was logged (after character ``start``)."""
        deadline = time.monotonic() + timeout
        while True:
            self.text += self.capfd.readouterr().err
            if text in self.text[start:] or time.monotonic() > deadline:
                return text in self.text[start:]
            time.sleep(0.05)

    def mark(self) -> int:
        """Return a position to count log lines from."""
        self.text += self.capfd.readouterr().err
        return len(self.text)


@pytest.fixture
def logs(capfd):
    return Logs(capfd)


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
    assert robot.next_actions
    action = robot.next_actions[0]   # stamped with the time it is for, named like the chunk
    assert list(action.name) == chunk.joint_names and len(action.position) == 7
    k = (conv.stamp_to_ns(action.header.stamp) - t0) // DT
    assert conv.stamp_to_ns(action.header.stamp) == t0 + k * DT and 0 <= k < 4
    assert np.allclose(action.position, chunk.points[k].positions)


def test_replans_once_per_execution_horizon_and_horizon_is_dynamic(system):
    node, robot = system(max_obs_age_s=30.0)  # a slow first chunk on a loaded CI machine
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
    status = robot.latest_status('/policy_node: inputs', newer_than=len(robot.diagnostics))
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
    status = robot.latest_status('/policy_node: inputs', newer_than=len(robot.diagnostics))
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


def test_a_reset_right_after_the_worker_looked_for_changes_still_runs_dense(system):
    """A reset between the worker's look for changes and its chunk clears the engine too.

    The node once left the engine reset to the worker's next look: a chunk of the new
    episode that started first reused the old episode's rollout cache (not dense, not what
    an offline replay computes).
    """
    node, robot = system(max_obs_age_s=30.0)
    t0 = now_ns()
    assert robot.drive(t0) is not None
    steps(robot, t0 + DT, 4)
    assert robot.wait_chunk(t0 + 4 * DT) is not None
    assert node.stats.counters['dense_chunks'] == 1
    apply_changes, armed = node._apply_changes, threading.Event()
    t1 = t0 + 10 * DT

    def reset_after_the_look():
        apply_changes()
        if armed.is_set():
            armed.clear()
            node._reset('test')
            version = node._inputs_version
            robot.publish_obs(t1)       # the new episode's first inputs arrive at once
            deadline = time.monotonic() + 3.0
            while node._inputs_version < version + 3 and time.monotonic() < deadline:
                time.sleep(0.005)

    node._apply_changes = reset_after_the_look
    armed.set()
    assert robot.wait_chunk(t1) is not None
    assert not armed.is_set()
    assert node.stats.counters['resets'] == 1
    assert node.stats.counters['dense_chunks'] == 2                # the new episode's first


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
    status = robot.latest_status('/policy_node: inference', newer_than=len(robot.diagnostics))
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
    robot.publish_obs(t0 + DT)
    assert robot.wait_chunk(count=1) is not None                # t0's or t0 + DT's window
    response = robot.call(ChangeState, 'policy_node/change_state', ChangeState.Request(
        transition=Transition(id=Transition.TRANSITION_DEACTIVATE)), probe=refused_transition())
    assert response is not None and response.success
    chunks = len(robot.chunks)
    steps(robot, t0 + 2 * DT, 6)
    time.sleep(0.5)
    assert len(robot.chunks) == chunks                           # inactive: robot holds
    status = robot.latest_status('/policy_node: inference', newer_than=len(robot.diagnostics))
    assert status.message == 'inactive: no chunks'
    dense = node.stats.counters['dense_chunks']
    node.trigger_activate()                                      # a new episode: dense first
    assert robot.drive(now_ns() + DT) is not None
    assert node.stats.counters['dense_chunks'] == dense + 1
    node.trigger_deactivate()
    node.trigger_cleanup()
    assert node.engine is None and not node._threads


# ==== issue 12: bad input from outside, lifecycle truth, portability ====

def test_future_stamps_are_rejected_logged_and_counted(system, logs):
    node, robot = system(max_future_stamp_s=0.5)
    since = robot.diagnostics_received
    future = now_ns() + 10_000_000_000                           # 10 s ahead of the clock
    steps(robot, future, 3)
    time.sleep(0.5)
    assert not robot.chunks
    assert node.stats.counters['future_stamps'] == 12          # 3 steps x 4 observation keys
    assert node.stats.counters['rejected_agentview_image'] == 3
    assert logs.wait('rejected agentview_image: stamped 9.')
    assert robot.wait_status('/policy_node: inputs', lambda st: st.level == b'\x01' and
                             'future_stamps' in st.message, since) is not None
    assert robot.drive(now_ns()) is not None                    # real-time stamps: served


def test_zero_quaternion_is_rejected_and_others_are_normalized(system, logs):
    node, robot = system(max_obs_age_s=30.0)
    t0 = now_ns()
    for i in range(2):
        robot.publish_image(t0 + i * DT)
        robot.publish_joints(t0 + i * DT)
        robot.publish_pose(t0 + i * DT, quat=(0.0, 0.0, 0.0, 0.0))
    time.sleep(0.5)
    assert not robot.chunks
    assert node.stats.counters['rejected_robot0_eef_quat'] == 2
    assert node.stats.counters['rejected_robot0_eef_pos'] == 0  # position is fine
    assert logs.wait('rejected robot0_eef_quat: orientation quaternion [0.0, 0.0, 0.0, 0.0]')
    t1 = t0 + 2 * DT
    for t in (t1, t1 + DT):
        robot.publish_image(t)
        robot.publish_joints(t)
        robot.publish_pose(t, quat=(0.0, 2.0, 0.0, 0.0))          # unnormalized: accepted
    assert robot.wait_chunk(count=1) is not None
    window, _ = node.history.window()
    assert np.allclose(window.arrays['robot0_eef_quat'][-1], [0.0, 1.0, 0.0, 0.0])


def test_a_silent_input_is_logged_once_per_gap(system, logs):
    node, robot = system(max_obs_age_s=0.3)
    t = now_ns()
    assert robot.drive(t) is not None
    start, gaps = logs.mark(), node.stats.counters['input_gaps']
    assert gaps == 0                                  # waiting at start-up is not a gap
    for _ in range(16):                                         # 0.8 s without the camera
        t += DT
        robot.publish_obs(t, camera=False)
        time.sleep(0.05)
    assert logs.wait('no chunks: stale or missing inputs agentview_image (', start=start)
    assert logs.text[start:].count('stale or missing') == 1
    assert node.stats.counters['input_gaps'] == gaps + 1
    t = now_ns()
    robot.publish_obs(t - DT)
    robot.publish_obs(t)
    assert robot.wait_chunk(count=2) is not None                # back to work
    assert logs.wait('all inputs fresh again', start=start)


def test_inverted_action_limits_are_rejected_after_broadcasting(system):
    node, robot = system()
    for name, value in (('action.upper', [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -2.0]),
                        ('action.lower', [2.0]), ('action.upper', [float('nan')])):
        result = node.set_parameters([Parameter(name, value=value)])[0]
        assert not result.successful, (name, value)
        assert 'action.lower must be below action.upper' in result.reason or \
            'finite' in result.reason, result.reason
    assert node.get_parameter('action.upper').value == [1.0]
    chunk = robot.drive(now_ns())
    values = np.array([p.positions for p in chunk.points])
    assert values.min() >= -1.0 and values.max() <= 1.0


def test_a_chunk_is_published_under_its_episode_check(system, monkeypatch):
    """A reset between the episode check and the publish cannot let an old chunk out."""
    node, robot = system()
    order, reset_done = [], threading.Event()
    to_trajectory = conv.chunk_to_trajectory

    class Recording:

        def __init__(self, pub):
            self.pub = pub

        def publish(self, msg):
            order.append('published')
            self.pub.publish(msg)

    def reset_in_the_gap(*args, **kwargs):
        msg = to_trajectory(*args, **kwargs)
        # Where the old code released the lock before publishing: reset from another
        # thread and give it the chance to finish first.
        threading.Thread(target=lambda: (node._reset('test'), order.append('reset'),
                                         reset_done.set())).start()
        reset_done.wait(0.5)
        return msg

    node.chunk_pub = Recording(node.chunk_pub)
    monkeypatch.setattr(conv, 'chunk_to_trajectory', reset_in_the_gap)
    robot.publish_obs(now_ns())
    assert reset_done.wait(3.0)
    time.sleep(0.2)
    # Either the chunk went out before the reset (it belonged to the episode then), or
    # it was discarded; never published after the reset.
    assert order in (['published', 'reset'], ['reset']), order
    assert order == ['published', 'reset'] or node.stats.counters['discarded_after_reset'] == 1


def test_deactivate_stops_an_in_flight_chunk(system):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    node, robot = system()
    in_flight, release = threading.Event(), threading.Event()
    predict = node.engine.predict_action

    def slow_predict(obs, **kwargs):
        in_flight.set()
        release.wait(5.0)
        return predict(obs, **kwargs)

    node.engine.predict_action = slow_predict
    robot.publish_obs(now_ns())
    assert in_flight.wait(3.0)
    response = robot.call(ChangeState, 'policy_node/change_state', ChangeState.Request(
        transition=Transition(id=Transition.TRANSITION_DEACTIVATE)), probe=refused_transition())
    assert response is not None and response.success
    release.set()
    deadline = time.monotonic() + 3.0
    while not node.stats.counters['discarded_inactive'] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node.stats.counters['discarded_inactive'] == 1
    time.sleep(0.2)
    assert not robot.chunks and not robot.next_actions          # nothing left the node
    assert not node.chunk_pub.is_activated                      # lifecycle publishers


def test_unexpected_configure_error_is_logged_and_start_up_exits_1(tmp_path, model_dir):
    isolate_ros(str(tmp_path / 'log'))
    code = ('import sys\n'
            'import sparse_policy_node.ros.policy_node as pn\n'
            'def load_engine(*args, **kwargs):\n'
            '    raise OSError(5, "Input/output error")\n'
            'pn.load_engine = load_engine\n'
            'sys.exit(pn.main(sys.argv[1:]))\n')
    proc = subprocess.run(
        [sys.executable, '-c', code, '--ros-args', '-p', f'model_dir:={model_dir}'],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1, proc.stderr
    assert 'cannot configure: OSError' in proc.stderr                   # the node's log
    assert 'cannot start: OSError' in proc.stderr and 'Input/output error' in proc.stderr


def test_failed_model_change_reverts_the_parameter_and_its_error_clears(system, model_dir,
                                                                        tmp_path):
    node, robot = system(max_obs_age_s=30.0)
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'config.json').write_bytes(open(os.path.join(model_dir, 'config.json'),
                                              'rb').read())
    (broken / 'model.safetensors').write_bytes(b'{"truncated')
    assert node.set_parameters([Parameter('model_dir', value=str(broken))])[0].successful
    deadline = time.monotonic() + 5.0
    while node.get_parameter('model_dir').value != model_dir and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.get_parameter('model_dir').value == model_dir   # reverted: what is served
    assert node.stats.counters['model_load_failures'] == 1
    since = robot.diagnostics_received
    assert robot.wait_status('/policy_node: inference', lambda st: st.level == b'\x02' and
                             'model change' in st.message, since) is not None
    assert node.set_parameters([Parameter('sparsity.target', value=0.6)])[0].successful
    t0 = now_ns()
    assert robot.drive(t0) is not None
    assert node.stats.counters['model_load_failures'] == 1      # no retry of the broken one
    since = robot.diagnostics_received
    assert robot.wait_status('/policy_node: inference', lambda st: st.level == b'\x00' and
                             st.message == 'serving', since) is not None


def test_diagnostics_names_hardware_id_and_levels(system):
    node, robot = system(namespace='robot1', max_obs_age_s=30.0)
    t0 = now_ns()
    assert robot.drive(t0) is not None
    inputs = robot.latest_status('/robot1/policy_node: inputs',
                                 newer_than=len(robot.diagnostics))
    assert inputs is not None and inputs.level == b'\x00', inputs
    assert inputs.hardware_id.endswith('/cpu')
    # A sync failure: the camera 30 ms off the others, beyond the 25 ms tolerance.
    since = robot.diagnostics_received
    robot.publish_image(t0 + DT + 30_000_000)
    robot.publish_joints(t0 + DT)
    robot.publish_pose(t0 + DT)
    assert robot.wait_status('/robot1/policy_node: inputs', lambda st: st.level == b'\x01'
                             and 'sync_failures' in st.message, since) is not None
    assert node.stats.counters['sync_failures'] == 1
    # A burst of rejected images.
    since = robot.diagnostics_received
    for i in range(3):
        robot.publish_image(t0 + (3 + i) * DT, image=Image(height=2, width=2, encoding='x'))
    assert robot.wait_status('/robot1/policy_node: inputs', lambda st: st.level == b'\x01'
                             and '3 rejected_agentview_image' in st.message, since) is not None
    # A worker error raises the inference status to ERROR until the next good chunk.
    predict = node.engine.predict_action

    def failing_predict(obs, **kwargs):
        raise RuntimeError('CUDA error: an illegal memory access')

    node.engine.predict_action = failing_predict
    t1 = now_ns()
    robot.publish_obs(t1 - DT)
    robot.publish_obs(t1)
    deadline = time.monotonic() + 3.0
    while not node.stats.counters['worker_errors'] and time.monotonic() < deadline:
        time.sleep(0.02)
    since = robot.diagnostics_received
    assert robot.wait_status('/robot1/policy_node: inference', lambda st: st.level == b'\x02'
                             and 'illegal memory access' in st.message, since) is not None
    node.engine.predict_action = predict
    assert robot.wait_chunk(count=2) is not None                # the same window, now good
    since = robot.diagnostics_received
    assert robot.wait_status('/robot1/policy_node: inference',
                             lambda st: st.level == b'\x00', since) is not None


def test_humble_rclpy_without_post_set_callbacks_still_applies_changes(system, monkeypatch):
    import rclpy.node
    monkeypatch.delattr(rclpy.node.Node, 'add_post_set_parameters_callback')
    node, robot = system()
    assert not node._params_watch.native                        # the fallback path
    assert node.set_parameters([Parameter('sparsity.target', value=0.8)])[0].successful
    deadline = time.monotonic() + 3.0
    while node.engine.runtime.target_sparsity != 0.8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node.engine.runtime.target_sparsity == 0.8


def test_ros_session_works_where_rclpy_init_is_no_context_manager(monkeypatch):
    import rclpy
    from sparse_policy_node.ros import compat
    real_init = rclpy.init
    monkeypatch.setattr(rclpy, 'init', lambda **kwargs: real_init(**kwargs) and None)
    monkeypatch.delattr(rclpy, 'try_shutdown')                  # Humble has none
    context = rclpy.Context()
    with compat.ros_session([], context=context):
        assert context.ok()
    assert not context.ok()


def test_node_starts_and_stops_on_humble_style_rclpy(tmp_path, model_dir):
    """main() with rclpy.init returning None, no try_shutdown, no post-set callbacks."""
    isolate_ros(str(tmp_path / 'log'))
    code = ('import sys\n'
            'import rclpy, rclpy.node\n'
            'del rclpy.node.Node.add_post_set_parameters_callback\n'
            'del rclpy.try_shutdown\n'
            'real_init = rclpy.init\n'
            'rclpy.init = lambda **kwargs: real_init(**kwargs) and None\n'
            'from sparse_policy_node.ros.policy_node import main\n'
            'sys.exit(main(sys.argv[1:]))\n')
    args = [f'{k}:={v}' for k, v in TINY_PARAMS.items()]
    cmd = [sys.executable, '-c', code, '--ros-args', '-p', f'model_dir:={model_dir}']
    for a in args:
        cmd += ['-p', a]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    lines = []
    for line in proc.stderr:  # serving, then (no inputs) the start-up wait from the worker
        lines.append(line)
        if 'waiting for the first inputs' in line:
            break
    proc.send_signal(signal.SIGINT)
    out = ''.join(lines) + proc.communicate(timeout=30)[1]
    assert proc.returncode == 0, out
    assert 'serving' in out and '[policy_node] summary' in out


def test_runtime_comes_from_the_serving_default_unless_given_explicitly(context, tmp_path):
    from sparse_policy_node.core.checkpoint import write_serving_config
    served = save_tiny_model(str(tmp_path / 'served'))
    write_serving_config(served, {'sparsity_enabled': True, 'gate_source': 'static',
                                  'target_sparsity': 0.6, 'sampler': 'ddim',
                                  'num_inference_steps': 4, 'rollout_max_age': 3},
                         {'point': 'static-60@ddim-4'})
    nodes = []
    try:
        for explicit in ({}, {'sampler.steps': 6}):
            node = PolicyNode(context=context, parameter_overrides=[
                Parameter(k, value=v) for k, v in
                dict(model_dir=served, num_threads=1, **explicit).items()])
            nodes.append(node)
            runtime = node.engine.runtime
            assert (runtime.sampler, runtime.gate_source, runtime.target_sparsity,
                    runtime.rollout_max_age) == ('ddim', 'static', 0.6, 3)
            assert runtime.num_inference_steps == explicit.get('sampler.steps', 4)
            assert node.get_parameter('sampler.steps').value == runtime.num_inference_steps
            assert node.get_parameter('sparsity.rollout_max_age').value == 3
        off = PolicyNode(context=context, parameter_overrides=[
            Parameter('model_dir', value=served), Parameter('serving_default', value=False),
            Parameter('sparsity.enabled', value=False), Parameter('sampler.steps', value=7)])
        nodes.append(off)
        runtime = off.engine.runtime  # declared defaults, not the served ones
        assert (runtime.sampler, runtime.gate_source, runtime.rollout_max_age) == (
            'ddpm', 'pruner', 0)
        bare = PolicyNode(context=context, parameter_overrides=[  # no serving.json, no pruner
            Parameter('model_dir', value=save_tiny_model(str(tmp_path / 'bare')))])
        nodes.append(bare)
        runtime = bare.engine.runtime  # the model's own schedule, dense (no pruner)
        assert (runtime.sampler, runtime.num_inference_steps, runtime.sparsity_enabled) == (
            'ddpm', 10, False)
        assert bare.get_parameter('sparsity.enabled').value is False
    finally:
        for node in nodes:
            node.close()
            node.destroy_node()


def test_a_graph_backend_is_built_beside_the_running_engine_while_chunks_go_on(
        system, monkeypatch):
    """Exporting and loading graphs takes seconds: the old engine serves meanwhile."""
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    from sparse_policy_node.core import engine
    node, robot = system(**{'inference.backend': 'torch'})
    release, real_make = threading.Event(), engine.make_backend

    def slow_export(*args, **kwargs):  # the export waits until the test saw chunks go on
        release.wait(30.0)
        return real_make(*args, **kwargs)
    monkeypatch.setattr(engine, 'make_backend', slow_export)
    try:
        assert node.set_parameters([Parameter('inference.backend',
                                              value='onnxruntime')])[0].successful
        t0 = now_ns()
        assert robot.drive(t0) is not None
        steps(robot, t0 + DT, 8)
        assert robot.wait_chunk(t0 + 4 * DT) is not None   # served while preparing
        assert robot.wait_chunk(t0 + 8 * DT) is not None
        assert node._preparer.busy()
        assert node.engine.backend_for(node.engine.runtime).name == 'torch'
    finally:
        release.set()
    deadline = time.monotonic() + 60.0
    while node.stats.counters.get('engine_swaps', 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.stats.counters.get('engine_swaps', 0) == 1
    assert node.engine.backend_for(node.engine.runtime).name == 'onnxruntime'
    assert node.get_parameter('inference.backend').value == 'onnxruntime'
    steps(robot, t0 + 9 * DT, 4)  # the swapped-in engine serves the next chunk
    assert robot.wait_chunk(t0 + 12 * DT, timeout=10.0) is not None


def test_backend_switches_between_chunks_and_a_missing_one_is_rejected(system, monkeypatch):
    pytest.importorskip('onnxruntime')
    node, robot = system()
    assert node.engine.backend_for(node.engine.runtime).name == 'onnxruntime'  # auto, CPU
    assert node.set_parameters([Parameter('inference.backend', value='torch')])[0].successful
    t0 = now_ns()
    assert robot.drive(t0) is not None
    steps(robot, t0 + DT, 4)
    assert robot.wait_chunk(t0 + 4 * DT) is not None
    assert node.engine.backend_for(node.engine.runtime).name == 'torch'
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # as if not installed
    result = node.set_parameters([Parameter('inference.backend', value='onnxruntime')])[0]
    assert not result.successful and 'onnxruntime package' in result.reason


def test_emulated_latency_holds_each_chunk_until_its_stamp_plus_the_latency(system):
    # A known latency with the node in the loop (bench-node --emulated-latency-ms): the
    # chunk is computed at once, published when the clock is 0.3 s past its observation.
    node, robot = system(**{'execution.emulated_latency_s': 0.3})
    t0 = now_ns()
    chunk = robot.drive(t0, timeout=10.0, retry=1.0)
    assert chunk is not None
    with robot.cond:
        received = robot.chunk_times[robot.chunks.index(chunk)]
    assert received >= t0 + 300_000_000
    assert node.stats.snapshot()['stamp_to_chunk_p50_ms'] >= 300.0


def test_rtc_passes_the_executing_chunk_into_the_next_one(system):
    # d pinned to 2 (floor = cap): the next chunk starts 2 steps before the 4-step chunk
    # ends, and its first steps are the ones the executing chunk still sends.
    node, robot = system(max_obs_age_s=30.0, **{
        'execution.mode': 'rtc', 'execution.delay_floor_steps': 2,
        'execution.delay_cap_steps': 2})
    prefixes = []
    predict = node.engine.predict_action

    def spy(obs, **kw):
        prefixes.append(kw.get('prefix'))
        return predict(obs, **kw)
    node.engine.predict_action = spy
    t0 = now_ns()
    first = robot.drive(t0)
    assert first is not None and prefixes == [None]   # nothing executes yet
    steps(robot, t0 + DT, 2)
    second = robot.wait_chunk(t0 + 2 * DT, timeout=5.0)  # lead = d = 2 steps
    assert second is not None and len(prefixes) == 2
    a = np.array([p.positions for p in first.points])
    b = np.array([p.positions for p in second.points])
    prefix = prefixes[1]
    if prefix is None:  # every delta of the first chunk was already sent: nothing to pin
        pytest.skip('the first chunk had run out before the second was computed')
    rows = prefix.actions[0].numpy()
    m = len(rows)
    assert np.allclose(rows, a[len(a) - m:])             # what the first chunk still sends
    pinned = min(2, m)
    assert prefix.weights[:pinned].tolist() == [1.0] * pinned
    assert np.allclose(b[:pinned], rows[:pinned], atol=1e-5)
