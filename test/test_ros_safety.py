"""The safety layer with real nodes on a simulated clock (issue 20's defects, one test each).

Every wait is for a condition with a deadline; the clock only moves when a test publishes
/clock, so control ticks happen exactly where the test puts them.
"""

import time

import numpy as np
import pytest
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from sparse_policy_node.core import model_card as mc
from sparse_policy_node.core.checkpoint import load_policy_config
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros.policy_node import PolicyNode
from sparse_policy_node.ros.testing import FakeRobot
from sparse_policy_node.ros.testing import save_tiny_model
from sparse_policy_node.ros.testing import Spinner
from sparse_policy_node.ros.testing import TINY_PARAMS
from std_msgs.msg import Float64MultiArray
from test_ros_actions import delta_card_model
import torch

DT = 50_000_000  # 20 Hz
T0 = 5_000_000_000
JOINTS = [f'arm_joint_{i}' for i in range(1, 8)]
# An FR3-like range: joint 4 lives in [-3.07, -0.07] rad, far outside +-1.
JOINT_RANGE = [[-2.9, -1.8, -2.9, -3.07, -2.9, 0.4, -3.0], [2.9, 1.8, 2.9, -0.07, 2.9, 4.5, 3.0]]


@pytest.fixture(scope='module')
def joint_model(tmp_path_factory):
    """Tiny model with a joint-position card and the arm's joint range."""
    model = save_tiny_model(str(tmp_path_factory.mktemp('joint')))
    card = mc.build_card(load_policy_config(model), 'joint_pos', 20.0, 'world',
                         names=JOINTS, joint_names=JOINTS)
    card['action']['range'] = JOINT_RANGE
    mc.write_card(model, card)
    return model


@pytest.fixture(scope='module')
def delta_model(tmp_path_factory):
    """Robosuite deltas integrated into pose targets."""
    return delta_card_model(tmp_path_factory.mktemp('delta'), 'integrated')


@pytest.fixture(scope='module')
def measured_delta_model(tmp_path_factory):
    """Robosuite deltas relative to the measured pose (one ~/next_action per tick)."""
    return delta_card_model(tmp_path_factory.mktemp('measured'), 'measured')


@pytest.fixture
def system(context):
    """Start a policy node (sim time) and a fake robot; yield a factory of overrides."""
    started = []

    def start(model=None, **overrides):
        values = dict(TINY_PARAMS, model_dir=model, max_future_stamp_s=2.0, use_sim_time=True)
        values.update(overrides)
        node = PolicyNode(context=context, parameter_overrides=[
            Parameter(k, value=v) for k, v in values.items()])
        multi = values.get('output.gripper_msg') == 'multi_array'
        robot = FakeRobot(context=context, sim_clock=True,
                          gripper_msg=Float64MultiArray if multi else None)
        robot.arm_pub = robot.create_publisher(JointState, 'arm_joint_states',
                                               qos_profile_sensor_data)
        started.append((Spinner(context, node, robot).__enter__(), node, robot))
        pubs = [robot.image_pub, robot.joint_pub, robot.pose_pub, robot.clock_pub,
                robot.enable_pub, node.chunk_pub, node.next_pub]
        deadline = time.monotonic() + 10.0
        while not all(p.get_subscription_count() for p in pubs) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        return node, robot

    yield start
    for spinner, node, robot in started:
        spinner.__exit__()
        node.close()
        node.destroy_node()
        robot.destroy_node()


JOINT_OUT = {'output.mode': 'joint_trajectory', 'output.joint_names': JOINTS,
             'output.joint_state_topic': 'arm_joint_states', 'action.names': JOINTS}


def force_actions(node, values):
    """Make the engine's chunks ``values`` (A,) at every step (the real engine still runs)."""
    predict = node.engine.predict_action

    def fixed(*args, **kwargs):
        out = predict(*args, **kwargs)
        a = out['action']
        out['action'] = torch.as_tensor(np.broadcast_to(values, a.shape[1:]).copy(),
                                        dtype=a.dtype)[None]
        return out
    node.engine.predict_action = fixed


def publish_until(publish, done, timeout_s=5.0, period_s=0.02):
    """Call ``publish()`` every ``period_s`` until ``done()`` holds or ``timeout_s`` passes.

    Returns:
        ``done()`` at the end: whether the node took the input before the deadline.
    """
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        publish()
        time.sleep(period_s)
    return done()


def set_clock(node, robot, t_ns, timeout=5.0):
    """Publish /clock at ``t_ns`` until the node's clock has it (a condition, not a sleep)."""
    return publish_until(lambda: robot.publish_clock(t_ns),
                         lambda: node.get_clock().now().nanoseconds >= t_ns,
                         timeout_s=timeout, period_s=0.01)


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def publish_arm(robot, node, position):
    """Publish the measured arm joints until the node has them."""
    def seen():
        j = node._joints
        return j is not None and np.allclose(j, position)
    msg = JointState(name=JOINTS, position=[float(v) for v in position])
    return publish_until(lambda: robot.arm_pub.publish(msg), seen)


def pose_seen(node, robot, t_ns, **pose):
    """Publish the measured pose stamped ``t_ns`` until the node has it.

    ``pose``: keywords of ``FakeRobot.publish_pose`` (position, quat, frame_id).

    Pose-target output integrates a chunk from the measured pose nearest its stamp. The pose
    and the observation arrive on separate subscriptions, so on a loaded machine the chunk
    of ``t_ns`` could be computed before its pose arrived, and be rejected.
    """
    return publish_until(lambda: robot.publish_pose(t_ns, **pose),
                         lambda: any(ns == t_ns for ns, _, _ in list(node._poses)))


def enable(robot, node, on=True):
    """Publish the enable input until the node has taken it."""
    def taken():
        now = node.get_clock().now().nanoseconds
        return (node.safety.deadman.reason(now, node.safety.config.enable_timeout_s) == '') \
            == on
    return publish_until(lambda: robot.publish_enable(on), taken)


def drive_at(node, robot, t_ns):
    """Sim time: publish the observations of ``t - dt`` and ``t``; wait for t's chunk."""
    assert set_clock(node, robot, t_ns - DT)
    robot.publish_obs(t_ns - DT)
    assert set_clock(node, robot, t_ns)
    return robot.drive(t_ns) is not None


def points(traj):
    return np.array([p.positions for p in traj.points])


def pose_of(msg):
    p, o = msg.pose.position, msg.pose.orientation
    return np.array([p.x, p.y, p.z]), np.array([o.x, o.y, o.z, o.w])


# ==== 1: absolute limits from the card ====

def test_joint_targets_use_the_card_range_not_plus_minus_one(system, joint_model, context):
    # The +-1 default, given explicitly as config/policy.yaml does, is not a limit here.
    node, robot = system(joint_model, **JOINT_OUT,
                         **{'action.lower': [-1.0], 'action.upper': [1.0]})
    target = np.array([0.0, 0.0, 0.0, -2.0, 0.0, 1.5, 0.0])
    force_actions(node, target)
    assert set_clock(node, robot, T0)
    assert publish_arm(robot, node, target)
    assert robot.drive(T0) is not None
    assert robot.wait_for(lambda: robot.joint_trajectories)
    # Joint 4 at -2.0 rad and joint 6 at 1.5 rad are commanded as such (not clamped to +-1).
    assert np.allclose(points(robot.joint_trajectories[0]), target)
    with pytest.raises(ValueError, match='contradict the model card'):
        PolicyNode(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in dict(
            TINY_PARAMS, model_dir=joint_model, **JOINT_OUT,
            **{'action.lower': [-5.0], 'action.upper': [5.0]}).items()])


# ==== 2: a chunk-mode hold of absolute actions repeats the last action ====

def test_chunk_mode_hold_of_an_absolute_model_repeats_the_last_action(system, joint_model):
    node, robot = system(joint_model, **{'safety.require_enable': True,
                                         'action.names': JOINTS})
    target = np.array([0.0, 0.3, 0.0, -2.0, 0.0, 1.5, 0.0])
    force_actions(node, target)
    assert set_clock(node, robot, T0)
    assert enable(robot, node)
    assert robot.drive(T0) is not None
    assert robot.wait_for(lambda: robot.next_actions)
    assert np.allclose(robot.next_actions[-1].position, target)
    assert enable(robot, node, False)
    assert set_clock(node, robot, T0 + DT)
    assert wait_until(lambda: node._holding is not None)
    assert robot.wait_for(lambda: len(robot.next_actions) >= 2)
    held = np.array(robot.next_actions[-1].position)
    assert np.allclose(held, target), held               # never zeros: a zero is a target


# ==== 3: safety.* applied live ====

def test_a_live_step_change_cap_applies_from_the_next_tick(system, measured_delta_model):
    node, robot = system(measured_delta_model)
    rows = np.tile([[0.5] * 6 + [1.0], [-0.5] * 6 + [-1.0]], (8, 1))
    predict = node.engine.predict_action

    def zigzag(*args, **kwargs):
        out = predict(*args, **kwargs)
        out['action'] = torch.as_tensor(rows[None, :out['action'].shape[1]],
                                        dtype=out['action'].dtype)
        return out
    node.engine.predict_action = zigzag
    result = node.set_parameters([Parameter('safety.max_step_change', value=[0.05])])[0]
    assert result.successful, result.reason
    result = node.set_parameters([Parameter('safety.require_enable', value=True)])[0]
    assert not result.successful and 'read-only' in result.reason
    assert set_clock(node, robot, T0)
    assert robot.drive(T0) is not None
    for i in range(1, 4):
        assert set_clock(node, robot, T0 + i * DT)
        assert robot.wait_for(lambda: len(robot.next_actions) >= i + 1)
    sent = np.array([m.position for m in robot.next_actions])
    assert np.abs(np.diff(sent, axis=0)).max() <= 0.05 + 1e-9


# ==== 4, 5: caps from what executes; no joint state is a hold ====

def test_a_late_chunk_does_not_jump_and_no_joint_state_holds(system, joint_model):
    node, robot = system(joint_model, **JOINT_OUT, **{'safety.max_joint_speed': 0.4})
    measured = np.array([0.0, 0.0, 0.0, -1.5, 0.0, 1.5, 0.0])
    force_actions(node, measured + 0.5)
    now = T0 + 12 * DT // 5            # the chunk of T0 is computed 2.4 steps late
    assert set_clock(node, robot, now)
    robot.publish_image(T0)
    robot.publish_joints(T0)
    robot.publish_pose(T0)
    # No measured joint state: nothing to cap from, so nothing is commanded.
    assert wait_until(lambda: node.stats.counters.get('held_no_joint_state', 0) >= 1)
    assert not robot.joint_trajectories
    assert publish_arm(robot, node, measured)
    now = T0 + DT + 7 * DT // 5         # 1.4 steps late: targets 2 and 3 are pending
    assert set_clock(node, robot, now)
    robot.publish_image(T0 + DT)
    robot.publish_joints(T0 + DT)
    robot.publish_pose(T0 + DT)
    assert robot.wait_for(lambda: robot.joint_trajectories, timeout=10.0)
    traj = robot.joint_trajectories[0]
    first = T0 + DT + conv.stamp_to_ns(traj.points[0].time_from_start)
    sent = node.get_clock().now().nanoseconds
    targets = points(traj) - measured
    # The first target moves at most the cap over the time left until it is due (not
    # (k0 + 1) caps from the chunk stamp), then a cap per step.
    assert np.abs(targets[0]).max() <= 0.4 * (first - min(now, sent)) / 1e9 + 1e-9
    assert np.abs(targets[0]).max() < 0.4 * DT / 1e9 + 1e-9
    assert np.all(np.abs(np.diff(targets, axis=0)) <= 0.4 * DT / 1e9 + 1e-9)


# ==== 5 (deadman): enable expires unless refreshed; cleared by reset ====

def test_enable_expires_without_refresh_and_reset_clears_it(system, delta_model):
    from std_srvs.srv import Trigger
    node, robot = system(delta_model, **{'output.mode': 'pose_target',
                                         'safety.require_enable': True,
                                         'safety.enable_timeout_s': 0.3})
    assert set_clock(node, robot, T0)
    assert enable(robot, node)
    assert pose_seen(node, robot, T0)
    assert robot.drive(T0) is not None
    assert robot.wait_for(lambda: robot.targets)
    commanded = pose_of(robot.targets[-1])
    holds = node.stats.counters['holds']            # the hold before the first enable
    # The deadman publisher dies: 0.35 s later the enable has expired.
    assert set_clock(node, robot, T0 + 7 * DT)
    assert wait_until(lambda: 'expired' in (node._holding or ''))
    n_chunks = len(robot.chunks)
    assert robot.drive(T0 + 8 * DT, timeout=1.0) is None and len(robot.chunks) == n_chunks
    held = [pose_of(m) for m in robot.targets[1:]]
    for p, q in held:                                # only the last target, repeated
        assert np.allclose(p, commanded[0]) and np.allclose(q, commanded[1])
    assert node.stats.counters['holds'] == holds + 1
    assert enable(robot, node)
    response = robot.call(Trigger, 'policy_node/reset', Trigger.Request())
    assert response is not None and response.success
    now = node.get_clock().now().nanoseconds
    assert node.safety.deadman.reason(now, 0.3) == 'enable input is off'


# ==== 6: what a hold sends ====

def test_silent_hold_publishes_nothing_while_disabled(system, delta_model):
    node, robot = system(delta_model, **{'output.mode': 'pose_target',
                                         'safety.require_enable': True,
                                         'safety.hold_output': 'silent'})
    assert set_clock(node, robot, T0)
    assert enable(robot, node)
    assert pose_seen(node, robot, T0)
    assert robot.drive(T0) is not None
    assert robot.wait_for(lambda: robot.targets)
    assert enable(robot, node, False)
    n = len(robot.targets)
    for i in range(1, 6):
        assert set_clock(node, robot, T0 + i * DT)
    assert wait_until(lambda: node._holding is not None)
    assert set_clock(node, robot, T0 + 6 * DT)
    assert not wait_until(lambda: len(robot.targets) > n, timeout=0.5)


def test_joint_hold_stops_at_the_target_in_force_not_measured(system, joint_model):
    node, robot = system(joint_model, **JOINT_OUT, **{'safety.require_enable': True})
    measured = np.array([0.0, 0.0, 0.0, -1.5, 0.0, 1.5, 0.0])
    force_actions(node, measured + 0.5)
    assert set_clock(node, robot, T0)
    assert publish_arm(robot, node, measured)       # the arm lags behind its command
    assert enable(robot, node)
    assert robot.drive(T0) is not None
    assert robot.wait_for(lambda: robot.joint_trajectories)
    assert enable(robot, node, False)
    assert set_clock(node, robot, T0 + 2 * DT)
    assert robot.wait_for(lambda: len(robot.joint_trajectories) >= 2)
    stop = robot.joint_trajectories[-1]
    assert len(stop.points) == 1
    # The target in force (the chunk's), not the measured joints: no pull-back.
    assert np.allclose(stop.points[0].positions, measured + 0.5)


def test_deactivate_sends_a_stop(system, delta_model):
    node, robot = system(delta_model, **{'output.mode': 'pose_target'})
    assert set_clock(node, robot, T0)
    assert pose_seen(node, robot, T0)
    assert robot.drive(T0) is not None
    assert robot.wait_for(lambda: robot.targets)
    last = pose_of(robot.targets[-1])
    n = len(robot.targets)
    node.trigger_deactivate()
    assert robot.wait_for(lambda: len(robot.targets) > n)
    assert np.allclose(pose_of(robot.targets[-1])[0], last[0])


# ==== 8: the first chunk after a pause is dense ====

def test_first_chunk_after_an_input_gap_is_dense(system, measured_delta_model):
    node, robot = system(measured_delta_model)
    dense = []
    predict = node.engine.predict_action

    def spy(*args, **kwargs):
        out = predict(*args, **kwargs)
        dense.append(bool(out['stats']['dense']))
        return out
    node.engine.predict_action = spy
    assert set_clock(node, robot, T0)
    assert robot.drive(T0) is not None
    t = T0 + 4 * DT
    for i in range(2):                  # a chunk every 4 steps: sparse after the first
        assert drive_at(node, robot, t)
        t += 4 * DT
    assert dense[0] and not dense[1] and not dense[2]
    t += 40 * DT                        # a 2 s gap in the inputs
    assert drive_at(node, robot, t)
    assert dense[-1] and node.stats.counters['dense_after_pause'] == 1


# ==== 9: the watchdog guards the publish path; unlimited activation warns ====

def on_second_chunk(node, act):
    """Run ``act()`` inside the engine call of the node's second chunk; return the calls."""
    predict = node.engine.predict_action
    calls = []

    def wrapped(*args, **kwargs):
        out = predict(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            act()
        return out
    node.engine.predict_action = wrapped
    return calls


def observe_second_window(node, robot):
    """After T0's chunk: the observations of T0 + 3 DT and T0 + 4 DT (the next window)."""
    for t in (T0 + 3 * DT, T0 + 4 * DT):
        assert set_clock(node, robot, t)
        robot.publish_obs(t)


def test_a_chunk_finished_after_a_stall_is_not_published(system, delta_model):
    # 1 s: the watchdog also counts wall time since arrival; a loaded machine must not trip it.
    node, robot = system(delta_model, **{'output.mode': 'pose_target',
                                         'safety.watchdog_s': 1.0})
    # The inputs stop while the second chunk is computed.
    on_second_chunk(node, lambda: set_clock(node, robot, T0 + 4 * DT + 40 * DT))
    assert set_clock(node, robot, T0)
    assert pose_seen(node, robot, T0)
    assert robot.drive(T0) is not None
    observe_second_window(node, robot)
    assert wait_until(lambda: node.stats.counters.get('discarded_holding', 0) >= 1)
    assert robot.wait_chunk(T0 + 4 * DT, timeout=0.5) is None


def test_a_chunk_computed_across_a_hold_is_dropped_and_the_next_one_is_dense(
        system, delta_model):
    node, robot = system(delta_model, **{'output.mode': 'pose_target',
                                         'safety.require_enable': True})
    took_over = []
    # The operator lets go and takes over again while the second chunk is computed.
    on_second_chunk(node, lambda: took_over.extend([
        enable(robot, node, False),
        set_clock(node, robot, T0 + 5 * DT),     # a tick holds
        wait_until(lambda: node._holding is not None),
        enable(robot, node)]))
    assert set_clock(node, robot, T0)
    assert enable(robot, node)
    assert pose_seen(node, robot, T0)
    assert robot.drive(T0) is not None
    dense = node.stats.counters.get('dense_after_pause', 0)
    observe_second_window(node, robot)
    assert wait_until(lambda: node.stats.counters.get('discarded_holding', 0) >= 1)
    assert took_over == [True] * 4
    # Before, that chunk went out and cleared the pause: nothing after it ran dense.
    assert drive_at(node, robot, T0 + 8 * DT)
    assert node.stats.counters['dense_after_pause'] == dense + 1


def test_a_late_chunk_still_ends_a_hold_for_missing_actions(system, delta_model):
    # The watchdog's "no action" hold is the one hold a chunk ends, so a chunk that was
    # computing when it began is published. The hold is injected the way the control tick
    # calls it: the real watchdog would have to fire within one chunk (0.2 s) while the
    # inputs stay fresh in wall time, which a loaded machine cannot promise.
    node, robot = system(delta_model, **{'output.mode': 'pose_target'})

    def no_action_hold():
        with node._lock:
            node._hold('watchdog: no action for 0.30 s (> 0.25 s)',
                       node.get_clock().now().nanoseconds)
    calls = on_second_chunk(node, no_action_hold)
    assert set_clock(node, robot, T0)
    assert pose_seen(node, robot, T0)
    assert robot.drive(T0) is not None
    observe_second_window(node, robot)
    assert wait_until(lambda: len(calls) >= 2 and node._holding is None)
    assert node.stats.counters['holds'] >= 1
    assert node.stats.counters.get('discarded_holding', 0) == 0


def test_unlimited_robot_output_warns_at_activation(system, context, delta_model):
    values = dict(TINY_PARAMS, model_dir=delta_model, autostart=False,
                  **{'output.mode': 'pose_target'})
    node = PolicyNode(context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in values.items()])
    said = []
    node.get_logger().warning = lambda msg, **kw: said.append(msg)
    try:
        node.trigger_configure()
        node.trigger_activate()
        assert any('no motion limit, no enable input and no watchdog' in m for m in said)
    finally:
        node.close()
        node.destroy_node()


# ==== 7: a live model swap keeps the card's contract ====

def test_live_swap_to_another_action_space_is_refused(system, delta_model, tmp_path):
    node, robot = system(delta_model, **{'output.mode': 'pose_target'})
    absolute = save_tiny_model(str(tmp_path / 'absolute'))     # same inputs, 7-D actions
    mc.write_card(absolute, mc.build_card(load_policy_config(absolute), 'abs_eef_pose', 20.0,
                                          'world', gripper_index=6))
    result = node.set_parameters([Parameter('model_dir', value=absolute)])[0]
    assert not result.successful and 'model card differs' in result.reason
    assert node.get_parameter('model_dir').value == delta_model


# ==== the arm profile ====

def test_real_arm_profile_through_late_chunks_deadman_live_cap_pause_swap_deactivate(
        system, delta_model, tmp_path):
    import os
    import yaml
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, 'config', 'real_arm_example.yaml')) as f:
        values = yaml.safe_load(f)['/**']['ros__parameters']
    for key in ('lowdim_map', 'device'):       # FakeRobot's topics and finger names
        values.pop(key)
    # The model is the test's; inputs in FakeRobot's frame; input ages also count wall time
    # since arrival, so the age limits are relaxed for a loaded test machine.
    values.update(model_dir=delta_model, pose_frame='world', max_obs_age_s=5.0,
                  **{'safety.watchdog_s': 2.0})
    node, robot = system(**values)
    sent, publish = [], node.target_pub.publish       # the targets sent, counted at the node
    node.target_pub.publish = lambda msg: (sent.append(msg), publish(msg))[1]
    c = node.safety.config
    lo, hi = c.workspace_min, c.workspace_max
    p_in = (0.5, 0.0, 0.4)

    def obs(t):
        robot.publish_image(t)
        robot.publish_joints(t)
        robot.publish_pose(t, position=p_in)

    def step(t, refresh=True):
        if refresh:
            robot.publish_enable(True)
        assert set_clock(node, robot, t)
        obs(t)

    assert set_clock(node, robot, T0)
    assert enable(robot, node)
    assert pose_seen(node, robot, T0, position=p_in)     # no pose before T0's to fall back on
    # Late chunks: the clock is 2.4 steps past the stamp when each chunk arrives.
    obs(T0)
    assert set_clock(node, robot, T0 + 12 * DT // 5)
    assert robot.wait_chunk(T0) is not None
    t = T0 + 3 * DT
    for _ in range(8):
        step(t)
        t += DT
    assert robot.wait_for(lambda: len(robot.targets) >= 4)
    n_fast = len(robot.targets)
    # A live cap change applies from the next tick: every target the node sends after the
    # change (counted at the node; delivery keeps the order) is under the new cap.
    assert node.set_parameters([Parameter('safety.max_linear_speed', value=0.05)])[0].successful
    n_capped = len(sent)
    for _ in range(6):
        step(t)
        t += DT
    assert robot.wait_for(lambda: len(robot.targets) >= n_capped + 3)
    poses = [pose_of(m) for m in robot.targets]
    for i, ((p0, q0), (p1, q1)) in enumerate(zip(poses, poses[1:])):
        cap = 0.25 if i + 1 < n_capped else 0.05
        assert np.linalg.norm(p1 - p0) <= cap * DT / 1e9 + 1e-9, (i, n_fast, n_capped)
        assert np.all(p1 >= lo - 1e-9) and np.all(p1 <= hi + 1e-9)
    assert node.stats.counters['safety_limited_steps'] > 0       # the caps were needed
    assert robot.wait_for(lambda: robot.grippers)               # a width for ros2_control
    assert all(0.0 <= m.data[0] <= 0.08 for m in robot.grippers)
    # The deadman publisher dies: the enable expires (logged once), only the last target
    # is repeated, no chunk goes out.
    holds = node.stats.counters['holds']
    for _ in range(6):
        step(t, refresh=False)
        t += DT
    assert wait_until(lambda: 'expired' in (node._holding or ''))
    assert node.stats.counters['holds'] == holds + 1
    n_held, chunks = len(robot.targets), len(robot.chunks)
    step(t, refresh=False)
    t += DT
    assert robot.wait_for(lambda: len(robot.targets) > n_held)
    last = pose_of(robot.targets[n_held - 1])
    assert all(np.allclose(pose_of(m)[0], last[0]) for m in robot.targets[n_held:])
    assert len(robot.chunks) == chunks
    # After the pause the first chunk is dense.
    assert enable(robot, node)
    for _ in range(3):
        step(t)
        t += DT
    assert robot.wait_for(lambda: len(robot.chunks) > chunks)
    assert node.stats.counters['dense_after_pause'] >= 1
    # A model swap to another action space is refused.
    other = save_tiny_model(str(tmp_path / 'absolute'))
    mc.write_card(other, mc.build_card(load_policy_config(other), 'abs_eef_pose', 20.0,
                                       'world', gripper_index=6))
    assert not node.set_parameters([Parameter('model_dir', value=other)])[0].successful
    # Deactivate: a stop at the last target, and the enable is cleared.
    n = len(robot.targets)
    node.trigger_deactivate()
    assert robot.wait_for(lambda: len(robot.targets) > n)
    assert np.allclose(pose_of(robot.targets[-1])[0], pose_of(robot.targets[n - 1])[0])
    assert node.safety.deadman.reason(t, 0.0) == 'enable input is off'


# ==== 10: gripper commands for ros2_control ====

def test_gripper_command_as_a_float64_multi_array_with_a_linear_width(system, delta_model):
    node, robot = system(delta_model, **{'output.mode': 'pose_target',
                                         'output.gripper_msg': 'multi_array',
                                         'output.gripper_mapping': 'linear',
                                         'output.gripper_open': 0.08,
                                         'output.gripper_closed': 0.0})
    got = robot.grippers
    assert wait_until(lambda: node.gripper_pub.get_subscription_count() >= 1)
    force_actions(node, np.array([0.0] * 6 + [0.5]))     # 0.5: three quarters closed
    assert set_clock(node, robot, T0)
    assert pose_seen(node, robot, T0)
    assert robot.drive(T0) is not None
    assert robot.wait_for(lambda: got)
    assert list(got[0].data) == pytest.approx([0.08 + 0.75 * (0.0 - 0.08)])
    with pytest.raises(ValueError, match='output.gripper_mapping'):
        from sparse_policy_node.ros.params import NodeSettings
        NodeSettings(output_gripper_mapping='bang')
