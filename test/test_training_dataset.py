"""robomimic-layout HDF5 round trip, DP-style window sampling and normalizer fitting."""

import json

import h5py
import numpy as np
import pytest
from sparse_policy_node.core.normalizer import Normalizer
from sparse_policy_node.training.dataset import demo_names
from sparse_policy_node.training.dataset import DemoWriter
from sparse_policy_node.training.dataset import fit_normalizer
from sparse_policy_node.training.dataset import load_episodes
from sparse_policy_node.training.dataset import read_env_args
from sparse_policy_node.training.dataset import WindowDataset

KEYS = ['agentview_image', 'robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos']


def episode(length, size=8, offset=0.0, seed=0):
    """Observations whose values encode the step index, and matching actions."""
    rng = np.random.default_rng(seed)
    obs = [{'agentview_image': rng.integers(0, 256, (3, size, size), dtype=np.uint8),
            'robot0_eef_pos': np.full(3, t + offset, np.float32),
            'robot0_eef_quat': np.array([0, 0, 0, 1], np.float32),
            'robot0_gripper_qpos': np.full(2, 0.01 * t, np.float32)} for t in range(length)]
    actions = np.tile(np.arange(length, dtype=np.float32)[:, None], (1, 7)) + offset
    return obs, actions


def test_hdf5_round_trip_in_robomimic_layout(tmp_path):
    path = str(tmp_path / 'demos.hdf5')
    episodes = [episode(5, seed=1), episode(7, offset=10.0, seed=2)]
    with DemoWriter(path, {'env_name': 'Lift', 'task': 'lift'}) as writer:
        for i, (obs, actions) in enumerate(episodes):
            writer.add(obs, actions, attrs={'seed': i})
    with h5py.File(path, 'r') as f:
        assert f['data'].attrs['total'] == 12
        assert f['data/demo_1'].attrs['num_samples'] == 7
        assert f['data/demo_1'].attrs['seed'] == 1
        assert f['data/demo_0/obs/agentview_image'].shape == (5, 8, 8, 3)  # robomimic HWC
        assert f['data/demo_0/actions'].shape == (5, 7)
        assert f['data/demo_1/dones'][()].tolist() == [0] * 6 + [1]
    assert read_env_args(path) == {'env_name': 'Lift', 'task': 'lift'}
    loaded = load_episodes(path, KEYS)
    for (obs, actions), got in zip(episodes, loaded):
        np.testing.assert_array_equal(got['action'], actions)
        for key in KEYS:
            np.testing.assert_array_equal(got[key], np.stack([o[key] for o in obs]))
    assert loaded[0]['agentview_image'].dtype == np.uint8


def test_reads_a_file_written_without_our_writer(tmp_path):
    path = str(tmp_path / 'robomimic.hdf5')
    with h5py.File(path, 'w') as f:
        data = f.create_group('data')
        data.attrs['env_args'] = json.dumps({'env_name': 'Lift'})
        for n in (10, 2):  # numeric, not lexicographic, order
            g = data.create_group(f'demo_{n}')
            g.attrs['num_samples'] = 3
            g['actions'] = np.full((3, 7), n, np.float64)
            g['obs/agentview_image'] = np.zeros((3, 4, 4, 3), np.uint8)
            g['obs/robot0_eef_pos'] = np.zeros((3, 3))
            g['obs/object'] = np.zeros((3, 10))
    assert demo_names(path) == ['demo_2', 'demo_10']
    loaded = load_episodes(path, ['agentview_image', 'robot0_eef_pos'])
    assert [e['action'][0, 0] for e in loaded] == [2.0, 10.0]
    assert loaded[0]['agentview_image'].shape == (3, 3, 4, 4)
    with pytest.raises(KeyError, match='robot0_eef_quat'):
        load_episodes(path, ['robot0_eef_quat'])


def test_windows_pad_like_diffusion_policy(tiny_config):
    # tiny: T_o = 2, T_a = 6, n_action_steps = 4.
    obs, actions = episode(5, size=32)
    data = {'action': actions}
    data.update({k: np.stack([o[k] for o in obs]) for k in KEYS})
    dataset = WindowDataset([data], tiny_config)
    # starts -1 .. L - T_a + n_action_steps - 1 = 2
    assert len(dataset) == 4
    first_obs, first_action = dataset[0]
    assert first_obs['robot0_eef_pos'][:, 0].tolist() == [0, 0]  # first frame repeated
    assert first_action[:, 0].tolist() == [0, 0, 1, 2, 3, 4]
    last_obs, last_action = dataset[3]
    assert last_obs['robot0_eef_pos'][:, 0].tolist() == [2, 3]
    assert last_action[:, 0].tolist() == [2, 3, 4, 4, 4, 4]  # last action repeated
    assert first_obs['agentview_image'].shape == (2, 3, 32, 32)
    assert set(first_obs) == set(KEYS)


def test_normalizer_fit_uses_limits_and_identity_for_quaternions():
    obs, actions = episode(6)
    data = {'action': actions}
    data.update({k: np.stack([o[k] for o in obs]) for k in KEYS[1:]})
    normalizer = Normalizer({'action': 7, 'robot0_eef_pos': 3, 'robot0_eef_quat': 4})
    fit_normalizer(normalizer, [data])
    import torch
    normed = normalizer.normalize('action', torch.from_numpy(actions))
    assert normed.min().item() == pytest.approx(-1.0) and normed.max().item() == pytest.approx(1)
    quat = torch.tensor([0.1, 0.2, 0.3, 0.9])
    assert torch.equal(normalizer.normalize('robot0_eef_quat', quat), quat)
