"""Output adapters and the safety layer, with real rclpy nodes (tiny random-weight model).

Each adapter's message is checked against what its consumer requires: a
joint_trajectory_controller (ros2_controllers) rejects a trajectory with empty or unknown
joint names, a point whose positions do not match the names, times that are not strictly
increasing, or a non-zero start stamp whose last point ends in the past; a Cartesian
controller takes a stamped pose in its frame. Every safety limit is driven past its bound.
"""

import time

import numpy as np
import pytest
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from sparse_policy_node.core import model_card as mc
from sparse_policy_node.core.checkpoint import load_policy_config
from sparse_policy_node.ros import actions as act
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros.policy_node import PolicyNode
from sparse_policy_node.ros.testing import FakeRobot
from sparse_policy_node.ros.testing import save_tiny_model
from sparse_policy_node.ros.testing import Spinner
from sparse_policy_node.ros.testing import TINY_PARAMS

DT = 50_000_000  # 20 Hz
P0, Q0 = np.array([0.1, 0.0, 1.0]), np.array([0.0, 1.0, 0.0, 0.0])  # FakeRobot's pose
JOINTS = [f'arm_joint_{i}' for i in range(1, 8)]


def delta_card_model(directory, reference):
    """Tiny model with a robosuite delta card (0.05 m / 0.5 rad per unit)."""
    model = save_tiny_model(str(directory))
    card = mc.robosuite_card(load_policy_config(model), {'env_kwargs': {}})
    card['action']['delta_reference'] = reference
    mc.write_card(model, card)
    return model


@pytest.fixture(scope='module')
def delta_model(tmp_path_factory):
    """Deltas that sum up into a trajectory (each relative to the previous target)."""
    return delta_card_model(tmp_path_factory.mktemp('delta'), 'integrated')


@pytest.fixture(scope='module')
def measured_delta_model(tmp_path_factory):
    """Deltas relative to the pose measured at their step (robosuite's OSC)."""
    return delta_card_model(tmp_path_factory.mktemp('measured'), 'measured')


@pytest.fixture(scope='module')
def joint_model(tmp_path_factory):
    """Tiny model with a joint-position card: 7 arm joints, no gripper."""
    model = save_tiny_model(str(tmp_path_factory.mktemp('joint')))
    mc.write_card(model, mc.build_card(load_policy_config(model), 'joint_pos', 20.0, 'world',
                                       names=JOINTS, joint_names=JOINTS))
    return model


@pytest.fixture
def system(context):
    """Start a policy node and a fake robot; yield a factory taking parameter overrides."""
    started = []

    def start(model, sim_clock=False, **overrides):
        values = dict(TINY_PARAMS, model_dir=model, max_future_stamp_s=2.0,
                      use_sim_time=sim_clock)
        values.update(overrides)
        node = PolicyNode(context=context, parameter_overrides=[
            Parameter(k, value=v) for k, v in values.items()])
        robot = FakeRobot(context=context, sim_clock=sim_clock)
        started.append((Spinner(context, node, robot).__enter__(), node, robot))
        # Discovery: messages published once below must not be lost to it.
        pubs = [robot.image_pub, robot.joint_pub, robot.pose_pub, node.chunk_pub,
                node.next_pub] + ([robot.clock_pub] if sim_clock else [])
        deadline = time.monotonic() + 10.0
        while not all(p.get_subscription_count() for p in pubs) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        return node, robot

    yield start
    for spinner, node, robot in started:
        spinner.__exit__()
        node.close()
        node.destroy_node()
        robot.destroy_node()


def now_ns():
    return time.time_ns() // DT * DT


def chunk_actions(chunk):
    return np.array([p.positions for p in chunk.points])


def pose_of(msg):
    p, o = msg.pose.position, msg.pose.orientation
    return np.array([p.x, p.y, p.z]), np.array([o.x, o.y, o.z, o.w])


def jtc_rejects(msg, controller_joints, now):
    """Return why a joint_trajectory_controller would reject ``msg`` ('' if it accepts).

    The checks of ros2_controllers' JointTrajectoryController for a topic message
    (allow_partial_joints_goal false, the default).
    """
    names = list(msg.joint_names)
    if not names:
        return 'Empty joint names on incoming trajectory.'
    if not msg.points:
        return 'Empty trajectory received.'
    if sorted(names) != sorted(controller_joints) or len(set(names)) != len(names):
        return "Joints on incoming trajectory don't match the controller joints."
    times = [conv.stamp_to_ns(p.time_from_start) for p in msg.points]
    for i, p in enumerate(msg.points):
        for field in (p.positions, p.velocities, p.accelerations, p.effort):
            if len(field) not in (0, len(names)):
                return f'Mismatch between joint_names size and data at point #{i}.'
        if not p.positions or not np.isfinite(p.positions).all():
            return f'point #{i} has no finite positions'
        if i and times[i] <= times[i - 1]:
            return f'Time between points {i - 1} and {i} is not strictly increasing'
    start = conv.stamp_to_ns(msg.header.stamp)
    if start and start + times[-1] < now:
        return 'Received trajectory with non-zero start time that ends in the past'
    return ''


# ==== pure functions ====

def test_late_delta_chunk_applies_each_delta_exactly_once():
    rng = np.random.default_rng(0)
    deltas = rng.uniform(-1, 1, (8, 7))
    limits = act.Limits(dt=0.05)
    pos, quat, out, n = act.integrate_deltas(deltas, P0, Q0, 0.05, 0.5, limits)
    assert n == 0 and np.allclose(out, deltas)
    # Target k is the measured pose plus deltas 0..k: a consumer that starts at step 3
    # (the chunk came 3 steps late) lands where all 4 first deltas lead, neither skipping
    # them (as skipping elapsed deltas would) nor applying them again.
    assert np.allclose(pos[3], P0 + 0.05 * deltas[:4, :3].sum(axis=0))
    q = Q0
    for k in range(8):
        q = act.quat_mul(act.quat_from_rotvec(0.5 * deltas[k, 3:6]), q)
        assert np.allclose(quat[k], q)
    assert act.first_pending_step(1000, 50, 1000 + 3 * 50 + 10, 8) == 4
    assert act.first_pending_step(1000, 50, 900, 8) == 0
    assert act.first_pending_step(1000, 50, 1000 + 50 * 50, 8) == 8


def test_rotation_formats_agree():
    v = np.array([0.3, -0.2, 0.5])
    q = act.quat_from_rotvec(v)
    assert np.allclose(act.rotvec_from_quat(q), v)
    x, y, z, w = q
    m = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                  [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                  [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    six = np.concatenate([m[:, 0], m[:, 1]])
    assert np.allclose(act.quat_from_rotation(six, 'rotation_6d'), q)
    assert np.allclose(act.quat_from_rotation(2 * q, 'quat_xyzw'), q)
    with pytest.raises(ValueError, match='zero quaternion'):
        act.quat_from_rotation(np.zeros(4), 'quat_xyzw')


# ==== adapters with real nodes ====

def test_joint_trajectory_is_accepted_by_a_joint_trajectory_controller(system, joint_model):
    node, robot = system(joint_model, **{'output.mode': 'joint_trajectory',
                                         'output.joint_names': JOINTS,
                                         'output.joint_state_topic': 'arm_joint_states',
                                         'action.names': JOINTS,
                                         'safety.max_joint_speed': 0.4})
    arm = robot.create_publisher(JointState, 'arm_joint_states', qos_profile_sensor_data)
    measured = np.linspace(-0.3, 0.3, 7)
    arm.publish(JointState(name=list(reversed(JOINTS)), position=list(measured[::-1])))
    time.sleep(0.2)
    t0 = now_ns()
    chunk = robot.drive(t0)
    assert chunk is not None
    assert robot.wait_for(lambda: robot.joint_trajectories)
    traj = robot.joint_trajectories[0]
    assert jtc_rejects(traj, JOINTS, conv.stamp_to_ns(traj.header.stamp)) == ''
    assert list(traj.joint_names) == JOINTS
    # time_from_start counts from the chunk stamp; elapsed targets are skipped, the rest are
    # the (speed-capped) chunk actions at their own step times.
    assert conv.stamp_to_ns(traj.header.stamp) == t0
    k0 = conv.stamp_to_ns(traj.points[0].time_from_start) // DT
    assert k0 >= 1 and [conv.stamp_to_ns(p.time_from_start) for p in traj.points] == [
        (k0 + i) * DT for i in range(len(traj.points))]
    targets = np.array([p.positions for p in traj.points])
    assert np.allclose(targets, chunk_actions(chunk)[k0:])
    # The joint speed cap (0.4 rad/s = 0.02 rad per step) from what executes: the first
    # target sent moves at most 0.4 * (its time - now) <= 0.02 from the measured joints,
    # each next one 0.02 (the elapsed steps of ~/action_chunk before k0 never run).
    steps = np.diff(np.vstack([measured, targets]), axis=0)
    assert np.abs(steps).max() <= 0.02 + 1e-9
    assert node.stats.counters['safety_limited_steps'] > 0


def test_joint_trajectory_output_refuses_a_delta_model(context, delta_model):
    with pytest.raises(ValueError, match='needs a joint_pos model'):
        PolicyNode(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in dict(
            TINY_PARAMS, model_dir=delta_model, **{'output.mode': 'joint_trajectory',
                                                   'output.joint_names': JOINTS}).items()])


def test_late_delta_chunk_becomes_pose_targets_from_the_measured_pose(system, delta_model):
    node, robot = system(delta_model, sim_clock=True, **{'output.mode': 'pose_target'})
    t0 = 5_000_000_000
    # The chunk of t0 is late: the clock is already 2.4 steps further when it is computed.
    robot.publish_clock(t0 + 12 * DT // 5)
    time.sleep(0.1)
    robot.publish_image(t0)
    robot.publish_joints(t0)
    robot.publish_pose(t0, position=P0, quat=Q0)
    chunk = robot.wait_chunk(t0)
    assert chunk is not None, (node.stats.counters, node.get_clock().now().nanoseconds)
    robot.publish_clock(t0 + 3 * DT)         # the clock runs on: one target per step
    assert robot.wait_for(lambda: len(robot.targets) >= 2)   # steps 2 and 3 of 0..3
    deltas = chunk_actions(chunk)
    stamps = [conv.stamp_to_ns(m.header.stamp) for m in robot.targets]
    assert stamps[0] >= t0 + 2 * DT          # elapsed targets are not sent
    for msg, stamp in zip(robot.targets, stamps):
        k = (stamp - t0) // DT
        assert msg.header.frame_id == 'world' and stamp == t0 + k * DT
        position, quat = pose_of(msg)
        # Every delta up to step k applied once, from the pose measured at the chunk stamp.
        assert np.allclose(position, P0 + 0.05 * deltas[:k + 1, :3].sum(axis=0), atol=1e-6)
        assert np.isclose(np.linalg.norm(quat), 1.0)
    assert robot.wait_for(lambda: robot.grippers)
    assert robot.grippers[0].data == pytest.approx(deltas[(stamps[0] - t0) // DT, 6])


def test_measured_reference_deltas_apply_to_the_pose_measured_at_their_step(
        system, measured_delta_model):
    node, robot = system(measured_delta_model, sim_clock=True, **{'output.mode': 'pose_target'})
    t0 = 5_000_000_000
    robot.publish_clock(t0)
    time.sleep(0.1)
    robot.publish_obs(t0)
    chunk = robot.wait_chunk(t0)
    assert chunk is not None and robot.wait_for(lambda: robot.targets)
    p1 = P0 + [0.01, -0.02, 0.03]             # the arm moved (not as far as asked)
    robot.publish_pose(t0 + DT, position=p1, quat=Q0)
    time.sleep(0.1)
    robot.publish_clock(t0 + DT)
    assert robot.wait_for(lambda: len(robot.targets) >= 2)
    deltas = chunk_actions(chunk)
    for msg, (k, base) in zip(robot.targets, [(0, P0), (1, p1)]):
        assert conv.stamp_to_ns(msg.header.stamp) == t0 + k * DT
        assert np.allclose(pose_of(msg)[0], base + 0.05 * deltas[k, :3], atol=1e-6)
        q = act.quat_mul(act.quat_from_rotvec(0.5 * deltas[k, 3:6]), Q0)
        assert np.allclose(pose_of(msg)[1], q, atol=1e-6)


# ==== safety layer ====

def test_pose_targets_respect_speed_caps_and_the_workspace_box(system, delta_model):
    lo, hi = P0 - [0.004, 0.004, 0.004], P0 + [0.004, 0.004, 0.004]
    node, robot = system(delta_model, sim_clock=True, **{
        'output.mode': 'pose_target', 'safety.max_linear_speed': 0.06,
        'safety.max_angular_speed': 0.4, 'safety.workspace_min': list(lo),
        'safety.workspace_max': list(hi)})
    t0 = 5_000_000_000
    robot.publish_clock(t0)
    time.sleep(0.1)
    robot.publish_obs(t0)
    assert robot.wait_chunk(t0) is not None
    for i in range(1, 4):
        robot.publish_clock(t0 + i * DT)
        time.sleep(0.05)
    assert robot.wait_for(lambda: len(robot.targets) >= 3)
    poses = [(P0, Q0)] + [pose_of(m) for m in robot.targets]
    for (p_prev, q_prev), (p, q) in zip(poses, poses[1:]):
        assert np.all(p >= lo - 1e-9) and np.all(p <= hi + 1e-9)
        assert np.linalg.norm(p - p_prev) <= 0.06 * 0.05 + 1e-9     # 3 mm per step
        angle = np.linalg.norm(act.rotvec_from_quat(act.quat_mul(q, act.quat_conj(q_prev))))
        assert angle <= 0.4 * 0.05 + 1e-6                          # 0.02 rad per step
    assert node.stats.counters['safety_limited_steps'] > 0


def test_delta_chunks_respect_the_step_change_limit_across_chunks(system, delta_model):
    node, robot = system(delta_model, **{'safety.max_step_change': [0.1]})
    t0 = now_ns()
    first = robot.drive(t0)
    robot.publish_obs(t0 + 3 * DT)
    second = robot.drive(t0 + 4 * DT)
    assert first is not None and second is not None
    # Within a chunk and from the action in force when the next chunk starts.
    actions = np.vstack([chunk_actions(first), chunk_actions(second)])
    assert np.abs(np.diff(actions, axis=0)).max() <= 0.1 + 1e-6
    assert node.stats.counters['safety_limited_steps'] > 0


def test_delta_chunks_keep_the_integrated_position_in_the_workspace_box(system, delta_model):
    lo, hi = P0 - 0.01, P0 + 0.01
    node, robot = system(delta_model, **{'safety.workspace_min': list(lo),
                                         'safety.workspace_max': list(hi),
                                         'safety.max_linear_speed': 0.5})
    t0 = now_ns()
    chunk = robot.drive(t0)
    assert chunk is not None
    actions = chunk_actions(chunk)
    # The deltas, integrated from the measured pose, stay inside the box and under the cap.
    path = P0 + 0.05 * np.cumsum(actions[:, :3], axis=0)
    assert np.all(path >= lo - 1e-6) and np.all(path <= hi + 1e-6)
    assert np.linalg.norm(0.05 * actions[:, :3], axis=1).max() <= 0.5 * 0.05 + 1e-9
    assert node.stats.counters['safety_limited_steps'] > 0


def test_enable_input_off_holds_and_on_commands(system, delta_model):
    node, robot = system(delta_model, **{'safety.require_enable': True})
    t0 = now_ns()
    assert robot.drive(t0, timeout=1.5) is None        # not enabled: no chunk
    # Hold in chunk mode: ~/next_action with zero motion.
    assert robot.wait_for(lambda: robot.next_actions)
    assert not np.any(robot.next_actions[-1].position)
    assert node.stats.counters['holds'] == 1
    status = robot.wait_status('/policy_node: inference',
                               lambda s: s.message.startswith('holding'), since=0)
    assert status is not None and status.level == b'\x01'        # WARN
    assert status.message == 'holding: enable input is off'
    robot.publish_enable(True)
    t1 = t0 + 40 * DT
    robot.publish_obs(t1 - DT)
    assert robot.drive(t1) is not None
    assert robot.wait_for(lambda: node._holding is None)     # released at the next tick
    robot.publish_enable(False)
    assert robot.wait_for(lambda: node.stats.counters['holds'] == 2)
    n = len(robot.chunks)
    robot.publish_obs(t1 + 39 * DT)
    assert robot.drive(t1 + 40 * DT, timeout=1.5) is None
    assert len(robot.chunks) == n


def test_watchdog_holds_at_the_last_target_when_inputs_stop(system, delta_model):
    node, robot = system(delta_model, **{'output.mode': 'pose_target',
                                         'safety.watchdog_s': 0.3})
    t0 = now_ns()
    assert robot.drive(t0) is not None
    on_grid = {t0 + k * DT for k in range(4)}

    def held_twice():
        after = [m for m in robot.targets if conv.stamp_to_ns(m.header.stamp) not in on_grid]
        sent = [m for m in robot.targets if conv.stamp_to_ns(m.header.stamp) in on_grid]
        return sent and len(after) >= 2 and conv.stamp_to_ns(
            robot.targets[-1].header.stamp) not in on_grid
    # No more inputs: the watchdog holds, re-sending the last target of the chunk.
    assert robot.wait_for(held_twice, timeout=5.0)
    assert 'watchdog' in (node._holding or '')
    sent = [m for m in robot.targets if conv.stamp_to_ns(m.header.stamp) in on_grid]
    last = max(sent, key=lambda m: conv.stamp_to_ns(m.header.stamp))
    held = robot.targets[-1]
    assert np.allclose(pose_of(held)[0], pose_of(last)[0])
    assert np.allclose(pose_of(held)[1], pose_of(last)[1])


def test_pose_in_another_frame_is_rejected(system, delta_model):
    node, robot = system(delta_model)
    t0 = now_ns()
    for i in range(3):
        robot.publish_image(t0 + i * DT)
        robot.publish_joints(t0 + i * DT)
        robot.publish_pose(t0 + i * DT, frame_id='base')
        time.sleep(0.01)
    assert robot.wait_for(lambda: node.stats.counters.get('frame_mismatches', 0) >= 3)
    assert robot.wait_chunk(t0 + 2 * DT, timeout=1.0) is None


def test_node_reports_what_disagrees_with_the_model_card(system, delta_model):
    node, _ = system(delta_model, **{'action.names': [f'a{i}' for i in range(7)],
                                     'pose_frame': 'base'})
    said = ' '.join(node.card_disagreements)
    assert 'action.names' in said and "pose_frame='base'" in said
    assert len(node.card_disagreements) == 2


def test_images_are_preprocessed_as_the_model_card_says(system, tmp_path):
    model = save_tiny_model(str(tmp_path / 'flip'))
    card = mc.robosuite_card(load_policy_config(model), {'env_kwargs': {}})
    card['cameras']['agentview']['flip_vertical'] = True   # trained on upside-down frames
    mc.write_card(model, card)
    node, robot = system(model)
    assert node._image_prep == {'agentview_image': ('cover_crop', True)}
    # A 32x64 frame: white outer quarters (cropped away to keep the aspect ratio) and a grey
    # band on top of the centre (at the bottom once flipped).
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :16] = img[:, 48:] = 255
    img[:8, 16:48] = 100
    t0 = now_ns()
    robot.publish_image(t0, image=conv.rgb_to_image(img))
    assert robot.wait_for(lambda: node.history.newest_stamps()['agentview_image'] == t0)
    frame = node.history._streams['agentview_image'][-1][1]
    assert frame.shape == (3, 32, 32) and frame.max() == 100
    assert (frame[:, -8:] == 100).all() and (frame[:, :-8] == 0).all()


# ==== chunk execution ====

def spy_raw_chunks(node):
    """Wrap the node's engine so that its raw (clamped) chunks are kept; return the list."""
    raw = []
    predict = node.engine.predict_action

    def spy(*args, **kwargs):          # the real engine; keep its raw chunks
        out = predict(*args, **kwargs)
        raw.append(np.clip(out['action'][0].double().cpu().numpy(), -1, 1))
        return out
    node.engine.predict_action = spy
    return raw


def drive_sim(robot, t_ns):
    """Sim time: move the clock to ``t_ns``, publish its observation, wait for its chunk."""
    robot.publish_clock(t_ns)
    time.sleep(0.05)
    return robot.drive(t_ns)


def test_early_replan_blends_the_new_chunk_into_the_old_one(system, joint_model):
    # Absolute actions (joint positions) in sim time: chunks align by time.
    node, robot = system(joint_model, sim_clock=True, **{
        'replan_lead_steps': 2, 'execution.mode': 'blend', 'execution.blend_steps': 2})
    raw = spy_raw_chunks(node)
    t0 = 5_000_000_000
    first = drive_sim(robot, t0)
    robot.publish_clock(t0 + DT)
    robot.publish_obs(t0 + DT)
    second = drive_sim(robot, t0 + 2 * DT)    # two steps before the first chunk runs out
    assert first is not None and second is not None and len(raw) == 2
    old, new = chunk_actions(first), raw[1][:4]
    got = chunk_actions(second)
    assert np.allclose(got[0], 2 / 3 * old[2] + 1 / 3 * new[0], atol=1e-6)
    assert np.allclose(got[1], 1 / 3 * old[3] + 2 / 3 * new[1], atol=1e-6)
    assert np.allclose(got[2:], new[2:], atol=1e-6)


def test_temporal_ensemble_averages_every_chunk_that_predicts_a_step(system, joint_model):
    decay = 0.5
    node, robot = system(joint_model, sim_clock=True, **{
        'replan_lead_steps': 3, 'execution.mode': 'ensemble',
        'execution.ensemble_decay': decay})
    raw = spy_raw_chunks(node)
    t0 = 5_000_000_000
    chunks = [drive_sim(robot, t0 + i * DT) for i in range(3)]   # a chunk every step
    assert all(c is not None for c in chunks) and len(raw) == 3
    got = chunk_actions(chunks[2])
    # Step 0 of the third chunk (t0 + 2 dt) is step 2 of the first and 1 of the second.
    w = np.exp(-decay * np.arange(3))
    expect = (w[0] * raw[0][2] + w[1] * raw[1][1] + w[2] * raw[2][0]) / w.sum()
    assert np.allclose(got[0], expect, atol=1e-6)
    expect = (w[0] * raw[0][3] + w[1] * raw[1][2] + w[2] * raw[2][1]) / w.sum()
    assert np.allclose(got[1], expect, atol=1e-6)
    assert np.allclose(got[3], raw[2][3], atol=1e-6)     # only the newest predicts t0 + 5 dt


def test_ensemble_of_deltas_is_refused_and_bad_execution_values_are_rejected(
        system, context, measured_delta_model):
    with pytest.raises(ValueError, match='averages absolute targets'):
        PolicyNode(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in dict(
            TINY_PARAMS, model_dir=measured_delta_model,
            **{'output.mode': 'pose_target', 'execution.mode': 'ensemble'}).items()])
    node, robot = system(measured_delta_model)
    for name, value, reason in [
            ('execution.blend_steps', 2, 'only applies to execution.mode blend'),
            ('execution.blend_steps', -1, 'blend_steps'),
            ('execution.ensemble_decay', -0.1, 'ensemble_decay'),
            ('execution.mode', 'blend', 'read-only')]:
        result = node.set_parameters([Parameter(name, value=value)])[0]
        assert not result.successful and reason in result.reason, (name, result.reason)


def test_late_delta_chunk_on_next_action_sends_every_delta_once(system, measured_delta_model):
    # Chunk output of robosuite deltas (a consumer applies each ~/next_action once).
    node, robot = system(measured_delta_model, sim_clock=True)
    t0 = 5_000_000_000
    robot.publish_clock(t0 + 12 * DT // 5)   # the chunk of t0 is computed 2.4 steps late
    time.sleep(0.1)
    robot.publish_image(t0)
    robot.publish_joints(t0)
    robot.publish_pose(t0)
    chunk = robot.wait_chunk(t0)
    assert chunk is not None
    for i in range(1, 5):                    # the clock runs on, one step at a time
        robot.wait_for(lambda: len(robot.next_actions) >= i, timeout=2.0)
        robot.publish_clock(t0 + 12 * DT // 5 + i * DT)
    assert robot.wait_for(lambda: len(robot.next_actions) >= 4)
    time.sleep(0.2)
    sent = np.array([m.position for m in robot.next_actions])
    # All four deltas, in order, each once; rounding (now - stamp) / dt dropped the first two.
    assert np.allclose(sent[:4], chunk_actions(chunk), atol=1e-9)
    assert [conv.stamp_to_ns(m.header.stamp) for m in robot.next_actions[:4]] == [
        t0 + k * DT for k in range(4)]
    assert node.stats.counters.get('superseded_deltas', 0) == 0


def test_ensemble_of_integrated_deltas_averages_the_pose_targets(system, delta_model):
    # Deltas that sum into a trajectory are integrated first, then ensembled as targets.
    decay = 0.5
    node, robot = system(delta_model, sim_clock=True, **{
        'output.mode': 'pose_target', 'replan_lead_steps': 3, 'execution.mode': 'ensemble',
        'execution.ensemble_decay': decay})
    raw = spy_raw_chunks(node)
    t0 = 5_000_000_000
    chunks = [drive_sim(robot, t0 + i * DT) for i in range(3)]
    assert all(c is not None for c in chunks) and len(raw) == 3
    t = t0 + 2 * DT

    def last_target():
        found = [m for m in robot.targets if conv.stamp_to_ns(m.header.stamp) == t]
        return found[-1] if found else None
    assert robot.wait_for(lambda: last_target() is not None)
    time.sleep(0.2)
    # Each chunk's target for t: the pose measured at its stamp (FakeRobot's P0) plus its
    # deltas up to t.
    targets = [P0 + 0.05 * raw[i][:3 - i, :3].sum(axis=0) for i in range(3)]
    w = np.exp(-decay * np.arange(3))
    expect = sum(wi * ti for wi, ti in zip(w, targets)) / w.sum()
    assert np.allclose(pose_of(last_target())[0], expect, atol=1e-6)
    assert np.isclose(np.linalg.norm(pose_of(last_target())[1]), 1.0)
