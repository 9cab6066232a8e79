"""``sparse-policy similarity``: unit-output similarity across control steps (Figure 9)."""

import json

from conftest import make_obs
import numpy as np
import pytest
from sparse_policy_node.core.checkpoint import save_policy
from sparse_policy_node.training.similarity import RecordingDensePolicy
from sparse_policy_node.training.similarity import SimilarityStats
import torch


def test_stats_average_cosines_per_distance_and_never_across_episodes():
    K, U = 2, 6
    base = torch.zeros(K, U, 1, 2)
    base[..., 0] = 1.0                        # every unit output along x
    turned = torch.zeros(K, U, 1, 2)
    turned[..., 1] = 3.0                      # orthogonal to base (norm does not matter)
    stats = SimilarityStats(K, U, max_distance=3)
    stats.new_episode()
    for chunk in (base, base, turned):        # cos(r1, r0) = 1, cos(r2, r1) = 0, d=2: 0
        stats.add_chunk(chunk)
    stats.new_episode()
    stats.add_chunk(turned)                   # alone in its episode: no pair at all
    out = stats.summary()
    assert out['chunks'] == 4
    assert out['pairs_by_distance'] == [2, 1, 0]
    assert np.allclose(out['rollout_consecutive'], 0.5)
    assert out['rollout_by_distance']['all'][:2] == [0.5, 0.0]
    assert out['rollout_by_distance']['all'][2] is None
    assert out['rollout_by_distance']['ffn'][:2] == [0.5, 0.0]
    # Within a chunk every step and every layer's unit points the same way.
    assert out['mean_timestep_neighbour'] == 1.0 and out['mean_forward_neighbour'] == 1.0
    assert out['timestep_neighbour'][0] == [None] * U
    assert out['forward_neighbour'][1][:3] == [None] * 3


def test_recording_changes_nothing_the_dense_policy_does(tiny_policy):
    obs = make_obs(tiny_policy)
    sched = tiny_policy.config.scheduler
    torch.manual_seed(3)
    expected = tiny_policy.predict_action(obs)['action_pred']
    stats = SimilarityStats(sched.num_inference_steps, tiny_policy.transformer.num_units, 2)
    recorder = RecordingDensePolicy(tiny_policy, stats, sched.sampler,
                                    sched.num_inference_steps)
    recorder.reset()
    torch.manual_seed(3)
    got = recorder.predict_action(obs)['action_pred']
    assert torch.equal(got, expected)
    recorder.predict_action(make_obs(tiny_policy, seed=1))
    out = stats.summary()
    assert out['chunks'] == 2 and out['pairs_by_distance'] == [1, 0]
    heat = np.array(out['rollout_consecutive'], dtype=float)
    assert heat.shape == (sched.num_inference_steps, tiny_policy.transformer.num_units)
    assert np.isfinite(heat).all() and (np.abs(heat) <= 1 + 1e-6).all()


@pytest.mark.sim
def test_command_writes_json_and_heat_map(tiny_policy, tmp_path, capsys):
    pytest.importorskip('robosuite')
    from sparse_policy_node.cli import main
    model_dir = str(tmp_path / 'model')
    save_policy(tiny_policy, model_dir, {'env_args': {'task': 'lift'}})
    out = tmp_path / 'sim'
    code = main(['similarity', '--model', model_dir, '--episodes', '2', '--seed-start', '5',
                 '--max-steps', '24', '--sampler', 'ddim', '--steps', '3',
                 '--max-distance', '2', '--out', str(out)])
    assert code == 0
    report = json.loads((out / 'similarity.json').read_text())
    assert [e['seed'] for e in report['episodes']] == [5, 6]
    chunks = sum(e['chunks'] for e in report['episodes'])
    assert report['chunks'] == chunks
    assert report['pairs_by_distance'] == [chunks - 2, chunks - 4]  # pairs stay in episodes
    assert len(report['rollout_consecutive']) == 3 and len(report['timesteps']) == 3
    assert (out / 'similarity.png').stat().st_size > 0
    assert 'rollout (R) similarity' in capsys.readouterr().out
