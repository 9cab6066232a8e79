"""Sparse columns of ``sparse-policy eval`` and the mask picture of a recorded episode."""

import json

import pytest
from sparse_policy_node.core.checkpoint import save_policy
from sparse_policy_node.core.checkpoint import save_pruner
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.pruner import Pruner
from sparse_policy_node.training.variants import parse_variant
from test_training_rollouts import write_tiny_rollouts
import torch


def add_pruner(policy, model_dir, bias=(0.0, 0.5, 0.4, 0.6)):
    torch.manual_seed(0)
    pruner = Pruner(PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32),
                    policy.transformer.num_units, policy.config.transformer.n_emb)
    with torch.no_grad():
        pruner.head.bias.copy_(torch.tensor(bias))
    save_pruner(pruner, model_dir, {'sampler': 'ddpm', 'num_inference_steps': 10,
                                    'target_sparsity': 0.7})


def test_variant_names():
    assert parse_variant('dial-95', 0.93) == ('dial', 0.95)
    assert parse_variant('only-rollout', 0.9) == ('only', 0.9)
    assert parse_variant('static', 0.93) == ('static', 0.93)
    assert parse_variant('ddim-16', 0.93) == ('ddim', 16)
    with pytest.raises(ValueError, match='unknown variant'):
        parse_variant('sparse-ish', 0.93)


@pytest.mark.sim
def test_eval_reports_sparse_columns_on_short_episodes(tiny_policy, tmp_path, capsys):
    pytest.importorskip('robosuite')
    from sparse_policy_node.cli import main
    model_dir = str(tmp_path / 'model')
    save_policy(tiny_policy, model_dir, {'env_args': {'task': 'lift'}})
    add_pruner(tiny_policy, model_dir)
    out = tmp_path / 'report'
    variants = ['dense', 'sparse', 'dial-50', 'only-rollout', 'static', 'ddim-2']
    # 8 env steps with 4 actions per chunk: 2 chunks, the second one gated.
    code = main(['eval', '--model', model_dir, '--episodes', '2', '--seed-start', '7',
                 '--max-steps', '8', '--variants', *variants, '--ablation-sparsity', '0.8',
                 '--json', '--out', str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for name in variants:
        assert f'success_{name}' in report and f'chunk_ms_{name}' in report
    assert 0.0 < report['realized_sparsity'] <= 0.9  # learned gates, step 0 always computes
    assert report['realized_sparsity'] == report['realized_sparsity_sparse']
    assert report['episode_sparsity'] == pytest.approx(report['realized_sparsity'] / 2)
    assert report['realized_sparsity_dial-50'] == pytest.approx(0.5)
    assert report['realized_sparsity_only-rollout'] == pytest.approx(0.8)
    ablation = report['episodes_only-rollout'][0]['reuse_counts']
    assert ablation['forward'] == ablation['timestep'] == 0 and ablation['rollout'] > 0
    assert abs(report['realized_sparsity_static'] - 0.8) <= 0.1
    assert 'realized_sparsity_dense' not in report
    assert (out / 'tradeoff.png').stat().st_size > 0 and (out / 'success.png').exists()


def test_masks_command_draws_a_recorded_episode(tiny_policy, tmp_path, capsys):
    from sparse_policy_node.cli import main
    model_dir, path = str(tmp_path / 'model'), str(tmp_path / 'rollouts.hdf5')
    write_tiny_rollouts(tiny_policy, model_dir, path, lengths=(3,))
    add_pruner(tiny_policy, model_dir)
    png = tmp_path / 'masks.png'
    assert main(['masks', '--model', model_dir, '--rollouts', path, '--out', str(png)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith('{')]
    assert [r['dense'] for r in rows] == [True, False, False]
    assert rows[0]['sparsity'] == 0.0 and rows[0]['l1'] < 1e-5  # dense replay = recording
    assert rows[1]['sparsity'] > 0.0
    assert png.stat().st_size > 1000
