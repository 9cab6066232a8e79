"""Quality beyond success: the dense-reference deviation probe and the variant grammar."""

from conftest import make_obs
import pytest
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.training.deviation import DeviationProbe
from sparse_policy_node.training.evaluate import summarize
from sparse_policy_node.training.sparse_eval import SparseVariant
from sparse_policy_node.training.variants import check_variant
from sparse_policy_node.training.variants import DensePolicy
from sparse_policy_node.training.variants import parse_variant
from sparse_policy_node.training.variants import variant_schedule
import torch


def test_dense_variant_deviates_by_exactly_zero_and_keeps_the_random_stream(tiny_policy):
    obs = make_obs(tiny_policy)
    probe = DeviationProbe(DensePolicy(tiny_policy), tiny_policy)
    torch.manual_seed(5)
    out = probe.predict_action(obs)
    after_probe = torch.rand(3)
    torch.manual_seed(5)
    plain = DensePolicy(tiny_policy).predict_action(obs)
    after_plain = torch.rand(3)
    assert out['action_dev'] == 0.0
    assert torch.equal(out['action'], plain['action'])
    assert torch.equal(after_probe, after_plain), 'the probe must not shift the episode RNG'
    assert out['chunk_ms'] > 0


def test_sparse_variant_deviation_is_positive_and_matches_a_direct_computation(tiny_policy):
    K = tiny_policy.config.scheduler.num_inference_steps
    rt = RuntimeConfig(gate_source='random', target_sparsity=0.8, num_inference_steps=K)
    probe = DeviationProbe(SparseVariant(tiny_policy, None, rt), tiny_policy)
    probe.reset()
    devs = []
    for chunk in range(3):
        obs = make_obs(tiny_policy, seed=chunk)
        torch.manual_seed(chunk)
        out = probe.predict_action(obs)
        torch.manual_seed(chunk)
        dense = tiny_policy.predict_action(obs)  # same draws, dense
        norm = tiny_policy.normalizer.normalize
        expected = (norm('action', out['action']) - norm('action', dense['action'])).abs().mean()
        assert out['action_dev'] == pytest.approx(float(expected), abs=1e-6)
        devs.append(out['action_dev'])
    assert devs[0] == 0.0, 'the first chunk of an episode is dense'
    assert all(d > 0 for d in devs[1:])
    stats = probe.episode_stats()
    assert stats['action_dev'] == pytest.approx(sum(devs) / 3, abs=1e-5)
    assert 'realized_sparsity' in stats
    probe.close()


def test_summary_reports_steps_per_successful_episode():
    episodes = [{'success': True, 'steps': 40, 'chunk_ms': 2.0},
                {'success': False, 'steps': 400, 'chunk_ms': 2.0},
                {'success': True, 'steps': 60, 'chunk_ms': 4.0}]
    report = summarize('models/lift', 'lift', [1, 2, 3], {}, {'dense': episodes,
                                                              'none': episodes[1:2]})
    assert report['steps_success_dense'] == 50.0
    assert report['steps_success_none'] is None
    assert report['success_dense'] == pytest.approx(2 / 3)


@pytest.mark.parametrize('name, kind, value, schedule', [
    ('dial-90', 'dial', 0.9, None),
    ('dial-0.9', 'dial', 0.9, None),  # fractions are accepted, not read as 0.9 %
    ('dial-60@ddim-10', 'dial', 0.6, ('ddim', 10)),
    ('sparse@ddpm-100', 'sparse', None, ('ddpm', 100)),
    ('dense@ddim-5', 'dense', None, ('ddim', 5)),
    ('ddim-16', 'ddim', 16, ('ddim', 16)),
    ('default', 'default', None, None),
])
def test_variant_grammar(name, kind, value, schedule):
    assert parse_variant(name, 0.93) == (kind, value)
    assert variant_schedule(name) == schedule


@pytest.mark.parametrize('name', ['dial-150', 'dial-0.995', 'ddim-0', 'dial-5@ddim-0',
                                  'default@ddim-10', 'sparse@euler-10', 'dial'])
def test_bad_variants_are_rejected_with_the_forms(name):
    with pytest.raises(ValueError, match='variant'):
        check_variant(name)
