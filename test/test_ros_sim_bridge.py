"""Bridge node + policy node in lockstep on sim time: episodes, results, bridge restart.

A small fake environment stands in for robosuite so these tests take seconds; the bring-up
test in test_ros_launch.py runs the real robosuite bridge.
"""

import threading
import time

import numpy as np
import rclpy
from rclpy.parameter import Parameter
from sparse_policy_node.ros.policy_node import PolicyNode
from sparse_policy_node.ros.sim_bridge_node import SimBridgeNode
from sparse_policy_node.ros.testing import save_tiny_model
from sparse_policy_node.ros.testing import Spinner
from sparse_policy_node.ros.testing import TINY_PARAMS


class FakeEnv:
    """Deterministic stand-in: success when the gripper has been closed 3 times."""

    def __init__(self, settings):
        self.size = tuple(settings.image_size)
        self.steps = self.closes = 0
        self.actions = []
        # Offscreen renderers are bound to the creating thread: record who touches the env.
        self.threads = {'create': threading.get_ident()}

    def obs(self):
        return {'agentview_image': np.full((3, *self.size), self.steps % 256, dtype=np.uint8),
                'robot0_eef_pos': np.zeros(3, np.float32),
                'robot0_eef_quat': np.array([0, 0, 0, 1], np.float32),
                'robot0_gripper_qpos': np.zeros(2, np.float32)}

    def reset(self, seed):
        self.threads['reset'] = threading.get_ident()
        self.steps = self.closes = 0
        return self.obs()

    def close(self):
        self.threads['close'] = threading.get_ident()

    def step(self, action):
        self.threads['step'] = threading.get_ident()
        self.steps += 1
        self.actions.append(np.asarray(action))
        self.closes += action[-1] > 0
        return self.obs(), 0.0, False, {'success': self.closes >= 3}


def policy(ctx, tmp_path):
    model = save_tiny_model(str(tmp_path / 'model'))
    values = dict(TINY_PARAMS, model_dir=model, use_sim_time=True)
    return PolicyNode(context=ctx, parameter_overrides=[Parameter(k, value=v)
                                                        for k, v in values.items()])


def bridge(ctx, episodes, steps=12, terminate=False):
    values = {'episodes': episodes, 'max_episode_steps': steps, 'image_size': [32, 32],
              'terminate_on_success': terminate}
    return SimBridgeNode(env_factory=FakeEnv, context=ctx, parameter_overrides=[
        Parameter(k, value=v) for k, v in values.items()])


def wait(future, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    return future.done()


def test_lockstep_episodes_execute_every_chunk_action(context, tmp_path):
    node = policy(context, tmp_path)
    sim = bridge(context, episodes=2)
    with Spinner(context, node, sim):
        assert wait(sim.finished) and sim.finished.result() == 0
    summary = sim.close()
    node.close()
    assert summary['episodes'] == 2 and [r['length'] for r in summary['results']] == [12, 12]
    # 12 steps / 4 actions = 3 chunks per episode, plus possibly one for an episode's final
    # observation, computed before the reset arrived and never executed.
    assert 6 <= summary['chunks'] <= 8 and summary['republished'] == 0
    assert node.stats.counters['dense_chunks'] == 2
    assert node.stats.counters['resets'] == 2
    assert len(sim.env.actions) == 24 and np.abs(np.array(sim.env.actions)).max() <= 1.0
    # Regression: rendering from another thread than the creator gave black / frozen images.
    assert len(set(sim.env.threads.values())) == 1, sim.env.threads
    assert set(sim.env.threads) == {'create', 'reset', 'step', 'close'}


def test_policy_survives_a_bridge_restart(context, tmp_path):
    node = policy(context, tmp_path)
    first = bridge(context, episodes=1, steps=40)
    with Spinner(context, node, first):
        assert wait(first.finished)
    first.close()
    first.destroy_node()
    # The new bridge's clock starts again at 1 s: the node sees time jump back.
    second = bridge(context, episodes=2)
    with Spinner(context, node, second):
        assert wait(second.finished) and second.finished.result() == 0
    summary = second.close()
    node.close()
    assert summary['episodes'] == 2 and 6 <= summary['chunks'] <= 8
    assert node.stats.counters['resets'] >= 3


def test_bridge_never_executes_a_chunk_of_the_previous_episode(context):
    from sparse_policy_node.ros import conversions as conv
    from std_srvs.srv import Trigger
    reset = rclpy.create_node('policy_node', context=context)
    reset.create_service(Trigger, '~/reset', lambda _, res: setattr(res, 'success', True) or res)
    sim = bridge(context, episodes=1, steps=4)
    names = [f'a{i}' for i in range(7)]
    with Spinner(context, sim, reset):
        deadline = time.monotonic() + 10.0
        while not sim._sent and time.monotonic() < deadline:  # first observation out
            time.sleep(0.02)
        with sim._cond:
            start, dt = sim._episode_start_ns, sim.dt_ns
        assert start > 0
        # A late chunk computed from the last observation of the previous episode.
        sim._on_chunk(conv.chunk_to_trajectory(np.zeros((4, 7)), names, dt,
                                               conv.ns_to_stamp(start - dt)))
        assert sim.counters['stale_chunks'] == 1 and sim._chunk is None
        sim._on_chunk(conv.chunk_to_trajectory(np.zeros((4, 7)), names, dt,
                                               conv.ns_to_stamp(start)))
        assert wait(sim.finished, timeout=10.0) and sim.finished.result() == 0
    summary = sim.close()
    reset.destroy_node()
    assert summary['stale_chunks'] == 1 and summary['results'][0]['length'] == 4


def test_pose_target_mode_tracks_the_node_targets_in_lockstep(context, tmp_path):
    """Node in output.mode pose_target, bridge in action_mode pose_target, in lockstep.

    The bridge acts as a Cartesian controller: every step is driven by the target stamped
    for it, the deltas integrated from the measured pose.
    """
    from sparse_policy_node.core.checkpoint import load_policy_config
    from sparse_policy_node.core.model_card import robosuite_card
    from sparse_policy_node.core.model_card import write_card
    model = save_tiny_model(str(tmp_path / 'model'))
    write_card(model, robosuite_card(load_policy_config(model), {'env_kwargs': {}}))
    values = dict(TINY_PARAMS, model_dir=model, use_sim_time=True,
                  **{'output.mode': 'pose_target'})
    node = PolicyNode(context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in values.items()])
    sim = SimBridgeNode(env_factory=FakeEnv, context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in {
            'episodes': 2, 'max_episode_steps': 10, 'image_size': [32, 32],
            'terminate_on_success': False, 'action_mode': 'pose_target'}.items()])
    with Spinner(context, node, sim):
        assert wait(sim.finished) and sim.finished.result() == 0
    summary = sim.close()
    node.close()
    assert summary['episodes'] == 2 and [r['length'] for r in summary['results']] == [10, 10]
    # One target per executed step (lockstep waits for each), none from an old episode
    # executed, and the round trip measured for each.
    assert summary['targets'] >= 20 and summary['bad_targets'] == 0
    assert summary['republished'] == 0 and summary['underruns'] == 0
    assert len(sim.env.actions) == 20 and np.abs(np.array(sim.env.actions)).max() <= 1.0
    assert node.stats.counters['chunks'] >= 6   # 10 steps / 4 actions per chunk, 2 episodes
