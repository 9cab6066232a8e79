"""Pruner training from demonstrations: demonstrated chunks as targets, frames as deployed."""

import json

import numpy as np
import pytest
from sparse_policy_node.cli import main
from sparse_policy_node.core.checkpoint import has_pruner
from sparse_policy_node.core.checkpoint import pruner_dirs
from sparse_policy_node.core.checkpoint import save_policy
from sparse_policy_node.training.dataset import DemoWriter
from sparse_policy_node.training.demo_targets import demos_to_rollouts
from sparse_policy_node.training.rollouts import load_rollouts
from sparse_policy_node.training.rollouts import read_rollout_attrs


def write_counting_demos(path, lengths=(12, 9, 10), action_dim=7):
    """Demos whose action k is (k, k, ...) and whose eef_pos x is k: indices are visible."""
    rng = np.random.default_rng(0)
    with DemoWriter(path) as writer:
        for length in lengths:
            obs = [{'agentview_image': rng.integers(0, 256, (3, 32, 32), dtype=np.uint8),
                    'robot0_eef_pos': np.array([k, 0, 0], dtype=np.float32),
                    'robot0_eef_quat': np.array([0, 0, 0, 1], dtype=np.float32),
                    'robot0_gripper_qpos': np.zeros(2, dtype=np.float32)}
                   for k in range(length)]
            writer.add(obs, np.repeat(np.arange(length, dtype=np.float32)[:, None],
                                      action_dim, axis=1))


@pytest.fixture
def model_and_demos(tiny_policy, tmp_path):
    model_dir, demos = str(tmp_path / 'model'), str(tmp_path / 'demos.hdf5')
    save_policy(tiny_policy, model_dir)
    write_counting_demos(demos)
    return model_dir, demos


def test_frames_are_demonstrated_chunks_spaced_as_deployed(model_and_demos, tmp_path):
    model_dir, demos = model_and_demos  # tiny: T_o 2, T_a 6, n_action_steps 4, DDPM-10
    out = str(tmp_path / 'targets.hdf5')
    summary = demos_to_rollouts(model_dir, demos, out, seed=5)
    assert summary['frames'] == [3, 3, 3] and summary['frame_stride'] == 4
    attrs = read_rollout_attrs(out)
    assert attrs['source'] == 'demonstrations' and attrs['sampler'] == 'ddpm'
    ep = load_rollouts(out)[0]
    # frame s = 0, 4, 8: obs steps s-1..s (clipped), actions s-1 .. s+4 (clipped)
    np.testing.assert_array_equal(ep['obs']['robot0_eef_pos'][:, :, 0], [[0, 0], [3, 4],
                                                                         [7, 8]])
    np.testing.assert_array_equal(ep['action_pred'][:, :, 0], [[0, 0, 1, 2, 3, 4],
                                                               [3, 4, 5, 6, 7, 8],
                                                               [7, 8, 9, 10, 11, 11]])
    assert ep['obs']['agentview_image'].shape == (3, 2, 3, 32, 32)
    assert ep['step_noise'].shape == (3, 10, 6, 7) and ep['step_noise'].std() > 0.5
    ddim = load_rollouts(demos_to_rollouts(model_dir, demos, str(tmp_path / 'd.hdf5'),
                                           sampler='ddim', steps=5, frame_stride=1)['out'])
    assert len(ddim[0]['action_pred']) == 12 and not ddim[0]['step_noise'].any()


def test_train_pruner_from_demos_installs_a_pruner(model_and_demos, tmp_path, capsys):
    model_dir, demos = model_and_demos
    assert main(['train-pruner', '--model', model_dir, '--demos', demos, '--out',
                 str(tmp_path / 'run'), '--epochs', '1', '--batch-episodes', '2',
                 '--val-episodes', '1', '--threads', '1', '--hidden-dim', '16', '--n-head', '2',
                 '--dim-feedforward', '32', '--warmup-steps', '1', '--install']) == 0
    assert 'best_epoch' in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert has_pruner(model_dir)
    assert list(pruner_dirs(model_dir)) == [('ddpm', 10)]  # the model's own schedule


def test_train_pruner_from_demos_for_another_schedule(model_and_demos, tmp_path):
    model_dir, demos = model_and_demos
    assert main(['train-pruner', '--model', model_dir, '--demos', demos, '--out',
                 str(tmp_path / 'run'), '--demo-sampler', 'ddim', '--demo-steps', '5',
                 '--max-demos', '2',
                 '--epochs', '1', '--batch-episodes', '2', '--val-episodes', '1',
                 '--threads', '1', '--hidden-dim', '16', '--n-head', '2',
                 '--dim-feedforward', '32', '--warmup-steps', '1', '--install']) == 0
    targets = str(tmp_path / 'run' / 'demo_targets.hdf5')
    assert read_rollout_attrs(targets)['sampler'] == 'ddim' and len(load_rollouts(targets)) == 2
    assert list(pruner_dirs(model_dir)) == [('ddim', 5)]


def test_demos_of_another_action_size_are_refused(tiny_policy, tmp_path):
    model_dir, demos = str(tmp_path / 'model'), str(tmp_path / 'demos.hdf5')
    save_policy(tiny_policy, model_dir)
    write_counting_demos(demos, action_dim=3)
    with pytest.raises(SystemExit, match='3-D actions, the model 7-D'):
        main(['train-pruner', '--model', model_dir, '--demos', demos, '--out',
              str(tmp_path / 'run')])
