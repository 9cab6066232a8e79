"""The safety layer on its own (pure numpy): bounds, caps from what was sent, deadman."""

import numpy as np
import pytest
from sparse_policy_node.ros import safety as sf
from sparse_policy_node.ros.params import NodeSettings

DT = 50_000_000
JOINT_CARD = {'action': {'space': 'joint_pos', 'dim': 3,
                         'range': [[-2.9, -3.07, -1.0], [2.9, -0.07, 1.0]]}}


def layer(require_enable=False, bounds=None, **overrides):
    s = NodeSettings(**overrides)
    lo, hi = bounds if bounds is not None else (-np.ones(3), np.ones(3))
    return sf.SafetyLayer(sf.config_from_settings(s, DT, 3, (lo, hi, 'test')), require_enable)


def test_absolute_bounds_come_from_the_card_never_the_default():
    lo, hi, src = sf.action_bounds('joint_pos', JOINT_CARD, [-1.0], [1.0], False, 3)
    assert lo.tolist() == [-2.9, -3.07, -1.0] and hi.tolist() == [2.9, -0.07, 1.0]
    assert 'card' in src
    lo, hi, _ = sf.action_bounds('joint_pos', {'action': {}}, [-1.0], [1.0], False, 3)
    assert np.all(np.isinf(lo)) and np.all(np.isinf(hi))       # no range: unbounded
    lo, hi, _ = sf.action_bounds('delta_eef', {'action': {}}, [-1.0], [1.0], False, 3)
    assert lo.tolist() == [-1.0] * 3                            # robosuite deltas: +-1
    with pytest.raises(sf.SafetyConfigError, match='contradict the model card'):
        sf.action_bounds('joint_pos', JOINT_CARD, [-1.0], [1.0], True, 3)
    lo, hi, _ = sf.action_bounds('joint_pos', JOINT_CARD, [-2.0, -3.0, -0.5],
                                 [2.0, -0.1, 0.5], True, 3)
    assert lo.tolist() == [-2.0, -3.0, -0.5]                    # narrower: applied


def test_model_bounds_read_the_space_from_the_card_and_the_default_as_unset():
    # The node's chunks and replay-bag's offline chunks both take their bounds from here.
    lo, hi, _ = sf.model_bounds(JOINT_CARD, [-1.0], [1.0], 3)
    assert lo.tolist() == [-2.9, -3.07, -1.0] and hi.tolist() == [2.9, -0.07, 1.0]
    lo, hi, _ = sf.model_bounds(None, [-1.0], [1.0], 3)          # no card: robosuite deltas
    assert lo.tolist() == [-1.0] * 3 and hi.tolist() == [1.0] * 3
    lo, _, src = sf.model_bounds(JOINT_CARD, [-2.0, -3.0, -0.5], [2.0, -0.1, 0.5], 3)
    assert lo.tolist() == [-2.0, -3.0, -0.5] and 'configured' in src   # narrower: applied


def test_step_change_is_measured_from_the_last_action_sent():
    s = layer(safety_max_step_change=(0.1,))
    assert np.allclose(s.action(np.zeros(3)), 0)
    # A new chunk starting far away: the first value sent moves one cap, not more.
    assert np.allclose(s.action(np.array([0.4, -0.4, 0.05])), [0.1, -0.1, 0.05])
    assert np.allclose(s.action(np.array([0.4, -0.4, 0.05])), [0.2, -0.2, 0.05])
    assert s.limited == 2
    # A live change applies to the next value.
    s.update(sf.config_from_settings(NodeSettings(safety_max_step_change=(0.01,)), DT, 3,
                                     (-np.ones(3), np.ones(3), 'test')))
    assert np.allclose(s.action(np.array([0.4, -0.4, 0.05])), [0.21, -0.21, 0.05])


def test_joint_targets_are_capped_from_the_target_in_force_and_need_a_reference():
    s = layer(bounds=(np.full(3, -3.0), np.full(3, 3.0)), safety_max_joint_speed=0.4)
    now = 1_000 * DT
    times = now + DT // 5 + np.arange(3) * DT          # a late chunk: the next point is close
    targets = np.full((3, 3), 0.5)
    assert s.trajectory(times, targets, now, None, slice(0, 3)) is None   # no reference
    out = s.trajectory(times, targets, now, np.zeros(3), slice(0, 3))
    assert np.allclose(out[0], 0.4 * 0.01)             # 0.4 rad/s over 10 ms, not k0 caps
    assert np.allclose(np.diff(out, axis=0), 0.4 * 0.05)
    # The stop point is the target in force, not the measured joints.
    stop = s.joint_stop(times[1], np.full(3, -1.0))
    assert np.allclose(stop, out[1])


def test_deadman_expires_and_is_cleared():
    s = layer(require_enable=True, safety_enable_timeout_s=0.3)
    assert s.hold(0, {}, None) == ('enable input is off', True)
    s.deadman.receive(True, 0)
    assert s.hold(int(0.2e9), {}, None) is None
    assert 'expired' in s.hold(int(0.4e9), {}, None).reason
    s.deadman.receive(True, int(0.4e9))
    assert s.hold(int(0.5e9), {}, None) is None
    s.deadman.clear()
    assert s.hold(int(0.5e9), {}, None) == ('enable input is off', True)


def test_only_the_watchdogs_no_action_hold_is_not_blocking():
    s = layer(safety_watchdog_s=0.5)
    assert s.hold(int(1e9), {'state': 0.1}, int(0.8e9)) is None
    stale = s.hold(int(1e9), {'state': 0.7, 'image': 0.2}, int(0.8e9))
    assert stale.blocking and 'input state is 0.70 s old' in stale.reason
    idle = s.hold(int(2e9), {'state': 0.1}, int(1e9))
    assert not idle.blocking and 'no action for 1.00 s' in idle.reason
    assert s.hold(int(2e9), {'state': 0.1}, None) is None   # covered now: no idle watchdog
    assert layer(safety_watchdog_s=0.0).hold(int(9e9), {'state': 5.0}, 0) is None


def test_pose_targets_are_capped_from_the_last_target_sent():
    s = layer(safety_max_linear_speed=0.1, safety_workspace_min=(0.0, -1.0, 0.0),
              safety_workspace_max=(1.0, 1.0, 1.0))
    q = np.array([0.0, 0.0, 0.0, 1.0])
    p, _ = s.pose(np.array([0.5, 0.0, 0.5]), q, reference=(np.array([0.5, 0.0, 0.5]), q))
    p, _ = s.pose(np.array([0.9, 0.0, 0.5]), q)
    assert np.allclose(p, [0.505, 0.0, 0.5])           # 0.1 m/s * 50 ms from the last sent
    p, _ = s.pose(np.array([0.5, 0.0, -0.5]), q)
    assert p[2] >= 0.0                                  # the box


def test_bad_hold_output_is_a_clear_error():
    with pytest.raises(ValueError, match='safety.hold_output'):
        NodeSettings(safety_hold_output='zero')


def test_the_safety_layer_is_pure_numpy():
    import ast
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'sparse_policy_node', 'ros', 'safety.py')
    with open(path) as f:
        tree = ast.parse(f.read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith('rclpy') or '_msgs' in n], names
    assert 'sparse_policy_node.ros' in names              # its actions: pure numpy too


def test_parameter_table_says_when_each_applies_and_what_a_change_rebuilds():
    from sparse_policy_node.ros import params
    table = {p.name: p for p in params.NODE_PARAMS}
    assert table['safety.max_joint_speed'].applies.startswith('live')
    assert table['safety.require_enable'].applies.startswith('at configure')
    assert table['model_dir'].applies == 'between chunks'
    assert 'Applies live' in table['safety.enable_timeout_s'].descriptor().description
    old = NodeSettings()
    assert params.what_to_rebuild(old, NodeSettings(safety_max_joint_speed=0.5)) == {'safety'}
    assert params.what_to_rebuild(old, NodeSettings(model_dir='x', num_threads=2)) == {
        'engine', 'threads'}
    assert params.what_to_rebuild(old, NodeSettings()) == set()
