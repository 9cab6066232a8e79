"""The whole-chunk sparse graph (``core/chunk_graph.py``), run eagerly on the CPU.

Its body (device gate map, :func:`cache.chunk_plan`, one ``cond`` per (step, unit)) is what a
GPU captures into conditional nodes; here it runs eagerly and must give the eager sparse
loop's chunks to 1e-5, the same executed choices and rollout-age statistics, and the same
cached values, over several chunks (rollout cache carried), for DDIM and DDPM, learned gates,
the sparsity dial and random gates with cache aging. The CUDA capture itself is untested here
(no GPU): ``test_core_engine_cuda.py`` and ``scripts/gpu_check.sh`` check it on a GPU.
"""

from conftest import make_obs
import pytest
from reuse_runs import tiny_policy_and_pruner
from sparse_policy_node.core.chunk_graph import conditional_nodes
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.engine import SparseEngine
import torch

CHUNKS = 6
CASES = {
    'ddim_learned': {'gate_source': 'pruner', 'sampler': 'ddim', 'num_inference_steps': 5},
    'ddpm_learned': {'gate_source': 'pruner', 'sampler': 'ddpm', 'num_inference_steps': 10},
    'ddim_dial': {'gate_source': 'pruner', 'target_sparsity': 0.8, 'sampler': 'ddim',
                  'num_inference_steps': 10, 'rollout_max_age': 2},
    'ddpm_dial_aged': {'gate_source': 'pruner', 'target_sparsity': 0.9, 'sampler': 'ddpm',
                       'num_inference_steps': 10, 'rollout_max_age': 1},
    'ddpm_random_aged': {'gate_source': 'random', 'target_sparsity': 0.8, 'sampler': 'ddpm',
                         'num_inference_steps': 10, 'rollout_max_age': 1},
}


def _engines(knobs):
    policy, pruner = tiny_policy_and_pruner()
    eager = SparseEngine(policy, pruner, RuntimeConfig(**knobs))
    whole = SparseEngine(policy, pruner, RuntimeConfig(**knobs))
    whole.graph_form = 'whole'
    return policy, eager, whole


@pytest.mark.parametrize('case', sorted(CASES))
def test_whole_chunk_body_equals_the_eager_loop(case):
    policy, eager, whole = _engines(CASES[case])
    K = CASES[case]['num_inference_steps']
    t = policy.config.transformer
    g = torch.Generator().manual_seed(5)
    reused = set()
    for c in range(CHUNKS):
        obs = make_obs(policy, 1, 300 + c)
        noise = torch.randn(1, t.horizon, t.action_dim, generator=g)
        step_noise = torch.randn(K, 1, t.horizon, t.action_dim, generator=g)
        a = eager.predict_action(obs, noise=noise, step_noise=step_noise)
        b = whole.predict_action(obs, noise=noise, step_noise=step_noise)
        assert torch.allclose(a['action_pred'], b['action_pred'], atol=1e-5, rtol=0), c
        assert torch.equal(eager.last_gates, whole.last_gates), c
        for key in ('realized_sparsity', 'dense', 'chunk_index', 'rollout_age_mean',
                    'rollout_age_max', 'rollout_expired', 'gmacs'):
            assert a['stats'][key] == b['stats'][key], (c, key)
        reused.update(whole.last_gates.unique().tolist())
    assert whole._cache_mode[0] == 'chunk' and eager._cache_mode[0] == 'eager'
    assert len(reused - {0}) >= 2, reused  # at least two reuse directions ran
    # the store holds the eager cache's rollout values, slot for slot
    graph = whole._graphs[whole._cache_mode]
    U = policy.transformer.num_units
    for k, row in enumerate(eager.cache.rollout):
        for b, value in enumerate(row):
            assert torch.allclose(graph.store[k * U + b], value, atol=1e-5), (k, b)
    assert graph.written.tolist() == eager.cache.written


def test_explicit_gates_and_reset_run_on_the_whole_chunk_graph():
    policy, eager, whole = _engines({'gate_source': 'pruner', 'sampler': 'ddim',
                                     'num_inference_steps': 5})
    U = policy.transformer.num_units
    gates = torch.randint(0, 4, (5, U), generator=torch.Generator().manual_seed(2))
    for c in range(4):
        if c == 2:
            eager.reset()
            whole.reset()
        obs = make_obs(policy, 1, 400 + c)
        torch.manual_seed(c)
        a = eager.predict_action(obs, gates=gates)
        torch.manual_seed(c)
        b = whole.predict_action(obs, gates=gates)
        assert a['stats']['dense'] == b['stats']['dense'] == (c in (0, 2))
        assert torch.allclose(a['action_pred'], b['action_pred'], atol=1e-5, rtol=0), c
        assert torch.equal(eager.last_gates, whole.last_gates), c
    assert whole._cache_mode[1][-1] == 'input'


def test_dense_runtimes_and_batches_stay_off_the_whole_chunk_graph():
    policy, _, whole = _engines({'sparsity_enabled': False, 'num_inference_steps': 10})
    whole.predict_action(make_obs(policy, 1, 0))
    assert whole._cache_mode[0] == 'eager'
    policy, _, whole = _engines({'gate_source': 'random', 'target_sparsity': 0.5,
                                 'num_inference_steps': 10})
    whole.predict_action(make_obs(policy, 2, 0))
    assert whole._cache_mode[0] == 'eager'


def test_conditional_nodes_need_cuda():
    ok, why = conditional_nodes(torch.device('cpu'))
    assert not ok and 'not a CUDA device' in why
