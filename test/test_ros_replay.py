"""Bag replay: a recorded lockstep run replays into a fresh node with identical chunks.

A tiny policy node with ``noise_seed`` serves two bridge episodes (the fast stand-in
environment of test_ros_sim_bridge.py) while the recorder writes the node's inputs and
chunks; the bag is then played into a new node (``sim:=none``, sim time from the player's
``/clock``) and every chunk is compared with the offline engine and with the recording.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from rclpy.parameter import Parameter
from sparse_policy_node.bags.offline import compare
from sparse_policy_node.bags.offline import ReplayError
from sparse_policy_node.bags.offline import split_episodes
from sparse_policy_node.bags.offline import window_at
from sparse_policy_node.bags.recorder import BagRecorder
from sparse_policy_node.bags.recorder import NODE_TOPICS
from sparse_policy_node.bags.replay import check_recorded
from sparse_policy_node.bags.replay import node_values
from sparse_policy_node.bags.replay import replay_bag
from sparse_policy_node.core.seeded_noise import chunk_seed
from sparse_policy_node.core.seeded_noise import draw_chunk_noise
from sparse_policy_node.ros.policy_node import PolicyNode
from sparse_policy_node.ros.sim_bridge_node import SimBridgeNode
from sparse_policy_node.ros.testing import save_tiny_model
from sparse_policy_node.ros.testing import Spinner
from sparse_policy_node.ros.testing import TINY_PARAMS
from test_ros_sim_bridge import FakeEnv
from test_ros_sim_bridge import wait

SEED = 7
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def policy_node(context, model, **extra):
    values = dict(TINY_PARAMS, model_dir=model, use_sim_time=True, noise_seed=SEED)
    values.update(extra)
    return PolicyNode(context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in values.items()])


def record_episodes(context, model, bag, episodes=2, steps=8):
    """Run lockstep bridge episodes against the node while recording; return its summary."""
    node = policy_node(context, model)
    sim = SimBridgeNode(env_factory=FakeEnv, context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in {'episodes': episodes, 'max_episode_steps': steps,
                                           'image_size': [32, 32],
                                           'terminate_on_success': False}.items()])
    recorder = BagRecorder(str(bag), NODE_TOPICS, context=context)
    with Spinner(context, node, sim, recorder):
        assert wait(sim.finished) and sim.finished.result() == 0
        time.sleep(0.5)  # the chunk of the last observation reaches the bag too
    recorder.close()
    sim.close()
    return node.close()


def assert_same_chunks(report, recorded):
    """Every recorded chunk has its replayed partner; extras only at episode ends.

    The recording node may have computed a chunk at an episode's last observation and
    discarded it (the bridge's reset came while it ran); in the replay the same chunk can
    finish before the reset and go out. It is compared with the offline engine like the rest.
    """
    assert report['recorded_chunks'] == recorded['chunks'], report
    assert report['unmatched_recorded'] == 0, report
    assert report['live_chunks'] - report['extra_live_chunks'] == recorded['chunks'], report
    assert report['extra_live_chunks'] <= report['episodes'], report


def test_replayed_chunks_match_the_offline_engine_and_the_recording(context, tmp_path):
    model = save_tiny_model(str(tmp_path / 'model'))
    bag = tmp_path / 'run_bag'
    recorded = record_episodes(context, model, bag)
    assert recorded['chunks'] >= 4 and recorded['dense_chunks'] == 2, recorded
    # Without a node: the recorded chunks themselves against the offline engine.
    values = node_values([os.path.join(ROOT, 'config', 'policy.yaml')],
                         dict(TINY_PARAMS, model_dir=model, noise_seed=SEED))
    offline = check_recorded(str(bag), values)
    assert offline['live_chunks'] == recorded['chunks'] and offline['episodes'] == 2
    assert offline['max_offline_diff'] <= 1e-5, offline

    node = policy_node(context, model)  # a fresh node, as after `launch sim:=none`
    try:
        with Spinner(context, node):
            report = replay_bag(context, str(bag), against_recorded=True)
            # The command line does the same through its own context and process.
            done = subprocess.run(
                [os.path.join(os.path.dirname(sys.executable), 'sparse-policy'),
                 'replay-bag', str(bag), '--against-recorded', '--json',
                 str(tmp_path / 'report.json')], capture_output=True, text=True, timeout=120)
            # Another seed: the node still matches the offline engine, not the recording.
            assert node.set_parameters([Parameter('noise_seed', value=SEED + 1)])[0].successful
            deadline = time.monotonic() + 5.0  # the worker applies it between chunks
            while node.settings.noise_seed != SEED + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            other = replay_bag(context, str(bag), against_recorded=True)
    finally:
        node.close()
    assert report['clock'] == 'sim' and report['noise_seed'] == SEED
    assert report['episodes'] == 2  # reset where the bridge ended the first episode
    assert_same_chunks(report, recorded)
    assert report['max_offline_diff'] <= 1e-5, report
    assert report['kept_steps'] == 0  # lockstep: every chunk compared whole
    assert report['max_recorded_diff'] <= 1e-5, report
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'chunks match' in done.stdout
    assert other['noise_seed'] == SEED + 1 and other['max_offline_diff'] <= 1e-5, other
    assert other['max_recorded_diff'] > 0.1  # the comparison sees the noise


def test_replay_refuses_an_unseeded_node(context, tmp_path):
    model = save_tiny_model(str(tmp_path / 'model'))
    node = policy_node(context, model, noise_seed=-1)
    try:
        with Spinner(context, node):
            with pytest.raises(ReplayError, match='unseeded'):
                replay_bag(context, str(tmp_path / 'no_bag'))
    finally:
        node.close()


def test_chunk_noise_is_a_function_of_seed_and_stamp():
    a = draw_chunk_noise(3, 1_050_000_000, (1, 6, 7), 10, ddpm=True)
    b = draw_chunk_noise(3, 1_050_000_000, (1, 6, 7), 10, ddpm=True)
    c = draw_chunk_noise(3, 1_100_000_000, (1, 6, 7), 10, ddpm=True)
    assert a['noise'].shape == (1, 6, 7) and a['step_noise'].shape == (10, 1, 6, 7)
    assert (a['noise'] == b['noise']).all() and (a['step_noise'] == b['step_noise']).all()
    assert not (a['noise'] == c['noise']).any()
    assert draw_chunk_noise(3, 1, (1, 6, 7), 10, ddpm=False)['step_noise'] is None
    assert chunk_seed(0, 0) != chunk_seed(1, 0) and 0 <= chunk_seed(5, 10 ** 18) < 2 ** 63
    with pytest.raises(ValueError):
        chunk_seed(-1, 0)


def test_offline_windows_follow_the_node_rule():
    dt = 50_000_000
    samples = [('a', 1_000_000_000 + i * dt, np.array([i], np.float32)) for i in range(4)]
    samples.insert(2, ('a', 1_000_000_000, np.array([9], np.float32)))   # out of order
    samples += [('a', 100_000_000, np.array([7], np.float32))]          # time jump
    episodes = split_episodes(samples, jump_ns=500_000_000)
    assert len(episodes) == 2 and [s for s, _ in episodes[0]['a']][-1] == 1_150_000_000
    arrays, stamps = window_at(episodes[0], 1_100_000_000, 3, dt, 10_000_000)
    assert arrays['a'][:, 0].tolist() == [0, 1, 2]
    arrays, _ = window_at(episodes[1], 100_000_000, 2, dt, 10_000_000)
    assert arrays['a'][:, 0].tolist() == [7, 7]  # episode start: the first step repeats
    with pytest.raises(ReplayError, match='no a message'):
        window_at({'a': [(0, np.zeros(1)), (10 * dt, np.zeros(1))]}, 10 * dt, 3, dt, 1)


def test_noise_seed_parameter_is_validated_and_launchable():
    from sparse_policy_node.core.config import ConfigError
    from sparse_policy_node.ros import launch_args
    from sparse_policy_node.ros import params
    assert params.NodeSettings().noise_seed == -1
    assert params.NodeSettings(noise_seed=0).noise_seed == 0
    for bad in (-2, 1.5, True):
        with pytest.raises(ConfigError, match='noise_seed'):
            params.NodeSettings(noise_seed=bad)
    values = launch_args.parse_launch_args(['sim:=none', 'noise_seed:=7'])
    plan = launch_args.plan_nodes(values, share_dir='/share')
    assert plan[0].overrides['noise_seed'] == 7
    with pytest.raises(ValueError, match='noise_seed'):
        launch_args.plan_nodes(launch_args.parse_launch_args(['noise_seed:=x']), '/share')


def test_compare_leaves_out_the_steps_a_late_chunk_kept():
    ref = np.zeros((4, 2))
    late = ref.copy()
    late[0] = 0.5          # the first step ran from the previous chunk
    rows = compare([(1, late), (2, ref), (3, ref)], {1: ref, 2: ref + 1.0}, tolerance=1e-5)
    assert rows[0] == {'stamp_ns': 1, 'max_abs_diff': 0.0, 'kept_steps': 1}
    assert rows[1]['max_abs_diff'] == 1.0 and rows[1]['kept_steps'] == 0  # all steps differ
    assert rows[2]['max_abs_diff'] is None
    assert compare([(1, late)], {1: ref})[0]['max_abs_diff'] == 0.5  # strict without tolerance


def test_replay_needs_chunks_the_engine_alone_decides():
    from sparse_policy_node.bags.replay import check_reproducible
    from sparse_policy_node.ros import params
    check_reproducible(params.NodeSettings(noise_seed=0))
    for bad, match in (({'noise_seed': -1}, 'unseeded'),
                       ({'safety_max_step_change': (0.1,)}, 'max_step_change'),
                       ({'safety_workspace_max': (1.0, 1.0, 1.0)}, 'workspace'),
                       ({'execution_mode': 'blend', 'execution_blend_steps': 2},
                        'execution')):
        with pytest.raises(ReplayError, match=match):
            check_reproducible(params.NodeSettings(**dict({'noise_seed': 0}, **bad)))
    with pytest.raises(ReplayError, match='unknown policy node parameter'):
        node_values([], {'noise_sead': 1})


class FakeCanEnv(FakeEnv):
    """The stand-in environment without a camera, with a 14-value object state."""

    def obs(self):
        obs = super().obs()
        del obs['agentview_image']
        obs['object'] = np.linspace(0.0, 1.0, 14, dtype=np.float32) * self.steps
        return obs


def test_state_only_run_replays_from_the_object_state_topic(context, tmp_path):
    """task:=can's topics: no image, the object state on object_state, all in the bag."""
    from test_ros_can import overlay
    from test_ros_can import save_tiny_lowdim_model
    model = save_tiny_lowdim_model(str(tmp_path / 'model'))
    lowdim_map = overlay('policy.yaml', 'policy_can.yaml')['lowdim_map']
    bag = tmp_path / 'can_bag'
    node = policy_node(context, model, lowdim_map=lowdim_map)
    sim = SimBridgeNode(env_factory=FakeCanEnv, context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in {'episodes': 1, 'max_episode_steps': 8,
                                           'cameras': [''], 'publish_object_state': True,
                                           'terminate_on_success': False}.items()])
    recorder = BagRecorder(str(bag), NODE_TOPICS, context=context)
    with Spinner(context, node, sim, recorder):
        assert wait(sim.finished) and sim.finished.result() == 0
        time.sleep(0.5)
    recorder.close()
    sim.close()
    recorded = node.close()
    assert recorded['chunks'] >= 2, recorded
    node = policy_node(context, model, lowdim_map=lowdim_map)
    try:
        with Spinner(context, node):
            report = replay_bag(context, str(bag), against_recorded=True)
    finally:
        node.close()
    assert_same_chunks(report, recorded)
    assert report['max_offline_diff'] <= 1e-5 and report['max_recorded_diff'] <= 1e-5, report


def test_an_episode_end_received_late_goes_before_the_next_episodes_inputs():
    """The recorder may get the bridge's result after the next episode's first inputs."""
    from types import SimpleNamespace
    from sparse_policy_node.bags.offline import EPISODE
    from sparse_policy_node.bags.replay import CHUNK
    from sparse_policy_node.bags.replay import INPUT
    from sparse_policy_node.bags.replay import place_episode_ends
    from sparse_policy_node.ros import conversions as conv

    def msg(ns):
        return SimpleNamespace(header=SimpleNamespace(stamp=conv.ns_to_stamp(ns)))

    ms = 1_000_000
    events = [(INPUT, 1, 'a', msg(100 * ms)), (CHUNK, 2, 'c', 100 * ms),
              (INPUT, 3, 'b', msg(150 * ms)),     # next episode, received before the end
              (INPUT, 4, 'a', msg(140 * ms)),     # this episode's last, received late
              (EPISODE, 5, 'e', 140 * ms),
              (INPUT, 6, 'a', msg(150 * ms)), (CHUNK, 7, 'c', 150 * ms),
              (EPISODE, 8, 'e', None),            # last stamp unknown: kept where it is
              (INPUT, 9, 'a', msg(10 * ms))]
    placed = place_episode_ends(events)
    assert [t for _, t, _, _ in placed] == [1, 2, 4, 5, 3, 6, 7, 8, 9]
    assert place_episode_ends(events[:2]) == events[:2]


def test_recorded_inputs_reset_before_the_first_input_stamped_after_an_episode():
    """The offline replay resets where the bridge did: after the ended episode's last stamp."""
    from types import SimpleNamespace
    from sparse_policy_node.bags.offline import EPISODE
    from sparse_policy_node.bags.replay import INPUT
    from sparse_policy_node.bags.replay import PendingReset
    from sparse_policy_node.bags.replay import recorded_inputs
    from sparse_policy_node.ros import conversions as conv

    def msg(ns):
        return SimpleNamespace(header=SimpleNamespace(stamp=conv.ns_to_stamp(ns)))

    events = [(EPISODE, 0, 'e', None),                # before any input: the replay's reset
              (INPUT, 1, 'a', msg(100)), (EPISODE, 2, 'e', 120),
              (INPUT, 3, 'b', msg(120)),              # the ended episode's last, late
              (INPUT, 4, 'a', msg(130)),              # the next episode's first
              (EPISODE, 5, 'e', None), (INPUT, 6, 'a', msg(10))]
    order = [topic if topic == EPISODE else stamp for topic, stamp, _ in recorded_inputs(events)]
    assert order == [100, 120, EPISODE, 130, EPISODE, 10]

    pending = PendingReset()
    assert not pending.before(5)                      # no episode ended
    pending.episode_ended(None)
    assert pending.before(5) and not pending.before(6)   # unknown end: the next input, once
