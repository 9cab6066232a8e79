"""Rollout recording: HDF5 round trip, noise-matched targets, and a short simulator rollout."""

from conftest import make_obs
import h5py
import numpy as np
import pytest
from sparse_policy_node.core.checkpoint import save_policy
from sparse_policy_node.training.rollouts import load_rollouts
from sparse_policy_node.training.rollouts import policy_fingerprint
from sparse_policy_node.training.rollouts import read_rollout_attrs
from sparse_policy_node.training.rollouts import RecordingPolicy
from sparse_policy_node.training.rollouts import RolloutWriter
from sparse_policy_node.training.rollouts import stack_frames
import torch


def write_tiny_rollouts(policy, model_dir, path, lengths=(3, 2, 4), seed=0):
    """Record dense chunks of ``policy`` on random observation windows into ``path``.

    No simulator: each episode is ``lengths[i]`` control steps of random windows, which is all
    pruner training needs to exercise its loop. Returns the recorded episodes (stacked).
    """
    save_policy(policy, model_dir, {'env_args': {'task': 'lift'}})
    recorder = RecordingPolicy(policy)
    torch.manual_seed(seed)
    sched = policy.config.scheduler
    attrs = {'model_dir': model_dir, 'policy_sha256': policy_fingerprint(model_dir),
             'task': 'lift', 'sampler': sched.sampler,
             'num_inference_steps': sched.num_inference_steps,
             'n_action_steps': policy.config.n_action_steps,
             'n_obs_steps': policy.config.transformer.n_obs_steps, 'seed_start': seed}
    stacked = []
    with RolloutWriter(path, attrs) as writer:
        for e, length in enumerate(lengths):
            recorder.reset()
            for f in range(length):
                recorder.predict_action(make_obs(policy, seed=100 * e + f))
            episode = stack_frames(recorder.frames)
            writer.add(episode, {'seed': seed + e, 'success': True, 'env_steps': 4 * length})
            stacked.append(episode)
    return stacked


def test_round_trip_keeps_every_array_and_attribute(tiny_policy, tmp_path):
    path = str(tmp_path / 'rollouts.hdf5')
    written = write_tiny_rollouts(tiny_policy, str(tmp_path / 'model'), path)
    attrs = read_rollout_attrs(path)
    assert attrs['sampler'] == 'ddpm' and attrs['num_inference_steps'] == 10
    assert attrs['num_episodes'] == 3
    loaded = load_rollouts(path)
    assert [len(e['action_pred']) for e in loaded] == [3, 2, 4]
    t = tiny_policy.config.transformer
    for got, want in zip(loaded, written):
        assert got['obs']['agentview_image'].dtype == np.uint8
        assert got['obs']['agentview_image'].shape[1:] == (t.n_obs_steps, 3, 32, 32)
        assert got['noise'].shape[1:] == (t.horizon, t.action_dim)
        assert got['step_noise'].shape[1:] == (10, t.horizon, t.action_dim)
        for key in ('noise', 'step_noise', 'action_pred'):
            np.testing.assert_array_equal(got[key], want[key])
        for key, value in want['obs'].items():
            np.testing.assert_array_equal(got['obs'][key], value)
    assert loaded[1]['attrs']['seed'] == 1 and loaded[1]['attrs']['num_frames'] == 2
    with h5py.File(path, 'r') as f:  # no pickled objects anywhere: plain datasets only
        assert f['episodes/ep_0/action_pred'].dtype == np.float32


def test_recorded_noise_reproduces_the_target(tiny_policy, tmp_path):
    path = str(tmp_path / 'rollouts.hdf5')
    write_tiny_rollouts(tiny_policy, str(tmp_path / 'model'), path, lengths=(2,))
    episode = load_rollouts(path)[0]
    f = 1
    obs = {k: torch.from_numpy(v[f])[None] for k, v in episode['obs'].items()}
    noise = torch.from_numpy(episode['noise'][f])[None]  # (1, T_a, A)
    step_noise = torch.from_numpy(episode['step_noise'][f])[:, None]  # (K, 1, T_a, A)
    out = tiny_policy.predict_action(obs, noise=noise, step_noise=step_noise)
    assert torch.equal(out['action_pred'][0], torch.from_numpy(episode['action_pred'][f]))


def test_rollouts_command_records_a_short_sim_episode(tiny_policy, tmp_path):
    pytest.importorskip('robosuite')
    from sparse_policy_node.cli import main
    model_dir = str(tmp_path / 'model')
    save_policy(tiny_policy, model_dir, {'env_args': {'task': 'lift'}})
    out = str(tmp_path / 'rollouts.hdf5')
    # A random tiny model never lifts the cube: keep the failure to check the layout.
    code = main(['rollouts', '--model', model_dir, '--out', out, '--num', '1',
                 '--seed-start', '50000', '--max-attempts', '1', '--max-steps', '6',
                 '--keep-failures'])
    assert code == 0
    attrs = read_rollout_attrs(out)
    assert attrs['policy_sha256'] == policy_fingerprint(model_dir)
    (episode,) = load_rollouts(out)
    n = tiny_policy.config.n_action_steps
    assert episode['attrs']['env_steps'] == 6 and not episode['attrs']['success']
    assert len(episode['action_pred']) == -(-6 // n)  # one frame per control step
    assert episode['attrs']['seed'] == 50000
