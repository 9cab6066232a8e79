"""Sparse engine: cache semantics against an independent reference, and engine rules.

Covers forced-dense rules, soft == hard, knob validation and bounded memory.
"""

from conftest import make_obs
import pytest
from sparse_policy_node.core.cache import FeatureCache
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.engine import SparseEngine
from sparse_policy_node.core.gates import random_gates
from sparse_policy_node.core.pruner import Pruner
from sparse_policy_node.core.sparse_sampler import sample_soft
import torch
import torch.nn.functional as F

K = 10


def runtime(**kwargs):
    kwargs.setdefault('num_inference_steps', K)
    return RuntimeConfig(**kwargs)


class ReferenceTTS:
    """Literal transcription of tts_method.md §6.2, with dictionaries for the caches."""

    def __init__(self, policy):
        self.policy = policy
        self.rollout = {}
        self.first = True

    def reset(self):
        self.rollout = {}
        self.first = True

    @torch.no_grad()
    def chunk(self, obs, noise, step_noise, gates, scheduler):
        model = self.policy.transformer
        cond = self.policy.encode_obs(obs)
        time_mem, obs_mem = model.encode_condition_parts(scheduler.timesteps, cond)
        kv_all = model.memory_kv_all_steps(time_mem, obs_mem)
        forward, timestep = {}, {}
        x_a = noise
        for k in range(scheduler.num_steps):
            x = model.embed_sample(x_a)
            for b in range(model.num_units):
                layer, kind = divmod(b, 3)
                s = 0 if self.first or k == 0 else gates[k][b]
                if s == 0:
                    k_all, v_all = kv_all[layer]
                    d = model.unit(layer, kind, x, kv=(k_all[:, k], v_all[:, k]))
                    forward[kind] = timestep[b] = self.rollout[(k, b)] = d
                elif s == 1:
                    d = forward[kind]
                elif s == 2:
                    d = timestep[b]
                else:
                    d = self.rollout[(k, b)]
                x = x + d
            x_a = scheduler.step(model.output(x), k, x_a, step_noise[k])
        self.first = False
        return self.policy.normalizer.unnormalize('action', x_a)


class FixedGates(SparseEngine):
    """Engine whose gate map is injected by the test (everything else unchanged)."""

    next_gates = None

    def _gate_map(self, runtime, time_mem, obs_mem):
        return self.next_gates[None]


def make_noise(policy, batch=1):
    t = policy.config.transformer
    return (torch.randn(batch, t.horizon, t.action_dim),
            torch.randn(K, batch, t.horizon, t.action_dim))


def test_all_compute_equals_dense_pipeline_bit_for_bit(tiny_policy):
    engine = SparseEngine(tiny_policy, None, runtime(sparsity_enabled=False))
    obs = make_obs(tiny_policy)
    noise, step_noise = make_noise(tiny_policy)
    dense = tiny_policy.predict_action(obs, noise=noise, step_noise=step_noise)
    for _ in range(2):
        out = engine.predict_action(obs, noise=noise, step_noise=step_noise)
        assert torch.equal(out['action_pred'], dense['action_pred'])
        assert out['stats']['realized_sparsity'] == 0.0


def test_cache_semantics_match_the_reference_across_chunks_and_resets(tiny_policy):
    engine = FixedGates(tiny_policy, None, runtime(gate_source='random', target_sparsity=0.7))
    ref = ReferenceTTS(tiny_policy)
    U = tiny_policy.transformer.num_units
    g = torch.Generator().manual_seed(3)
    for chunk in range(7):
        if chunk == 4:
            engine.reset()
            ref.reset()
        obs = make_obs(tiny_policy, seed=chunk)
        noise, step_noise = make_noise(tiny_policy)
        gates = random_gates(K, U, 0.7, ('forward', 'timestep', 'rollout'), g)
        engine.next_gates = gates
        out = engine.predict_action(obs, noise=noise, step_noise=step_noise)
        expected = ref.chunk(obs, noise, step_noise, gates.tolist(), engine.scheduler)
        assert torch.equal(out['action_pred'], expected), chunk
        executed = engine.last_gates
        if chunk in (0, 4):
            assert out['stats']['dense'] and (executed == 0).all()
        else:
            assert not out['stats']['dense']
            assert (executed[0] == 0).all(), 'step 0 must compute every unit'
            assert torch.equal(executed[1:], gates[1:])
            assert out['stats']['realized_sparsity'] == pytest.approx(
                float((gates[1:] != 0).sum()) / (K * U))


def test_rollout_reuse_returns_the_value_of_the_last_rollout_that_computed_it(tiny_policy):
    engine = FixedGates(tiny_policy, None, runtime(gate_source='random', target_sparsity=0.5))
    U = tiny_policy.transformer.num_units
    obs = make_obs(tiny_policy)
    engine.predict_action(obs)  # chunk 0: dense, fills R
    first = engine.cache.rollout[5][4]
    gates = torch.zeros(K, U, dtype=torch.long)
    gates[5, 4] = 3  # chunk 1 reuses R at (5, 4): no refresh
    engine.next_gates = gates
    engine.predict_action(make_obs(tiny_policy, seed=1))
    assert engine.cache.rollout[5][4] is first
    assert engine.cache.rollout[5][3] is not first
    gates[5, 4] = 0  # chunk 2 computes it: refreshed
    engine.predict_action(make_obs(tiny_policy, seed=2))
    assert engine.cache.rollout[5][4] is not first


def test_forward_and_timestep_caches_reset_every_chunk_rollout_survives():
    cache = FeatureCache(6)
    assert cache.begin_chunk(('ddpm', 1, 3, 2, 1), 3) is True
    value = torch.ones(1)
    cache.store(2, 4, value)
    assert cache.lookup(1, 2, 1) is value  # forward: same kind (4 % 3 == 1)
    assert cache.lookup(2, 0, 4) is value  # timestep: same unit, any step
    assert cache.lookup(3, 2, 4) is value  # rollout: same (step, unit)
    assert cache.lookup(3, 1, 4) is None
    assert cache.begin_chunk(('ddpm', 1, 3, 2, 1), 3) is False
    assert cache.lookup(1, 2, 1) is None and cache.lookup(2, 0, 4) is None
    assert cache.lookup(3, 2, 4) is value
    # A new schedule invalidates the rollout cache and forces a dense chunk.
    assert cache.begin_chunk(('ddim', 1, 3, 1), 2) is True
    assert cache.num_tensors() == 0


def test_empty_slot_falls_back_to_compute(tiny_policy):
    engine = FixedGates(tiny_policy, None, runtime(gate_source='random', target_sparsity=0.5))
    U = tiny_policy.transformer.num_units
    obs = make_obs(tiny_policy)
    engine.predict_action(obs)
    engine.cache.rollout[2][1] = None  # simulate a missing slot
    gates = torch.full((K, U), 3, dtype=torch.long)
    engine.next_gates = gates
    out = engine.predict_action(obs)
    assert engine.last_gates[2, 1] == 0
    assert torch.isfinite(out['action']).all()


def test_schedule_change_forces_dense_and_reset_clears(tiny_policy):
    engine = SparseEngine(tiny_policy, None, runtime(gate_source='random', target_sparsity=0.8))
    obs = make_obs(tiny_policy)
    assert engine.predict_action(obs)['stats']['dense']
    assert not engine.predict_action(obs)['stats']['dense']
    engine.set_runtime(runtime(gate_source='random', target_sparsity=0.8, sampler='ddim',
                               num_inference_steps=5))
    out = engine.predict_action(obs)
    assert out['stats']['dense'] and out['stats']['num_steps'] == 5
    assert len(engine.cache.rollout) == 5
    assert not engine.predict_action(obs)['stats']['dense']
    engine.reset()
    assert engine.predict_action(obs)['stats']['dense']


def test_soft_path_equals_hard_path(tiny_policy):
    U = tiny_policy.transformer.num_units
    engine = FixedGates(tiny_policy, None, runtime(gate_source='random', target_sparsity=0.6))
    soft_cache = FeatureCache(U)
    g = torch.Generator().manual_seed(0)
    for chunk in range(4):
        obs = make_obs(tiny_policy, seed=chunk)
        noise, step_noise = make_noise(tiny_policy)
        gates = random_gates(K, U, 0.6, ('forward', 'timestep', 'rollout'), g)
        engine.next_gates = gates
        hard = engine.predict_action(obs, noise=noise, step_noise=step_noise)
        sched = engine.scheduler
        first = soft_cache.begin_chunk(('x',), K)
        used = torch.zeros_like(gates) if first else gates.clone()
        used[0] = 0
        with torch.no_grad():
            cond = tiny_policy.encode_obs(obs)
            model = tiny_policy.transformer
            kv_all = model.memory_kv_all_steps(*model.encode_condition_parts(sched.timesteps,
                                                                             cond))
            soft = sample_soft(model, sched, kv_all, noise,
                               F.one_hot(used, 4).float()[None], soft_cache, step_noise)
        soft = tiny_policy.normalizer.unnormalize('action', soft)
        assert torch.allclose(soft, hard['action_pred'], atol=1e-6), chunk


def test_batched_engine_matches_batch_one_runs(tiny_policy):
    engine = SparseEngine(tiny_policy, None, runtime(gate_source='static', target_sparsity=0.5))
    singles = [SparseEngine(tiny_policy, None, runtime(gate_source='static',
                                                       target_sparsity=0.5))
               for _ in range(2)]
    for chunk in range(3):
        obs = make_obs(tiny_policy, batch=2, seed=chunk)
        noise, step_noise = make_noise(tiny_policy, batch=2)
        batched = engine.predict_action(obs, noise=noise, step_noise=step_noise)
        for i, single in enumerate(singles):
            one = {k: v[i:i + 1] for k, v in obs.items()}
            out = single.predict_action(one, noise=noise[i:i + 1],
                                        step_noise=step_noise[:, i:i + 1])
            assert torch.allclose(out['action_pred'], batched['action_pred'][i:i + 1],
                                  atol=1e-5)
        assert batched['stats']['dense'] == (chunk == 0)


def test_cache_memory_stays_bounded_over_many_chunks(tiny_policy):
    engine = SparseEngine(tiny_policy, None, runtime(gate_source='random', target_sparsity=0.9))
    obs = make_obs(tiny_policy)
    U = tiny_policy.transformer.num_units
    bound = 3 + U + K * U
    for i in range(300):
        out = engine.predict_action(obs)
        assert engine.cache.num_tensors() <= bound
        assert torch.isfinite(out['action']).all()
        if i % 100 == 99:
            engine.reset()
    assert len(engine.cache.rollout) == K


def test_nonfinite_chunk_is_refused_and_clears_the_caches(tiny_policy):
    from sparse_policy_node.core.engine import NonFiniteActionError
    engine = SparseEngine(tiny_policy, None, runtime(gate_source='random', target_sparsity=0.5))
    obs = make_obs(tiny_policy)
    engine.predict_action(obs)
    with torch.no_grad():
        tiny_policy.transformer.head.bias[0] = float('nan')
    with pytest.raises(NonFiniteActionError):
        engine.predict_action(obs)
    assert engine.cache.num_tensors() == 0
    with torch.no_grad():
        tiny_policy.transformer.head.bias[0] = 0.0
    out = engine.predict_action(obs)
    assert out['stats']['dense'] and torch.isfinite(out['action']).all()


def test_knob_validation(tiny_policy):
    with pytest.raises(ConfigError, match='no pruner'):
        SparseEngine(tiny_policy, None, runtime(gate_source='pruner'))
    engine = SparseEngine(tiny_policy, None, runtime(sparsity_enabled=False))
    with pytest.raises(ConfigError, match='num_train_timesteps'):
        engine.set_runtime(runtime(num_inference_steps=50, sparsity_enabled=False))
    assert engine.runtime.sparsity_enabled is False


def test_learned_gates_run_concurrently_and_match_synchronous_argmax(tiny_policy):
    torch.manual_seed(0)
    pruner = Pruner(PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32),
                    tiny_policy.transformer.num_units, tiny_policy.config.transformer.n_emb)
    with torch.no_grad():
        pruner.head.bias.copy_(torch.tensor([0.0, 0.5, 0.4, 0.6]))
    engine = SparseEngine(tiny_policy, pruner.eval(), runtime(gate_source='pruner'))
    obs = make_obs(tiny_policy)
    engine.predict_action(obs)
    out = engine.predict_action(obs)
    with torch.no_grad():
        cond = tiny_policy.encode_obs(obs)
        tm, om = tiny_policy.transformer.encode_condition_parts(engine.scheduler.timesteps, cond)
        expected = pruner(tm, om)[0].argmax(-1)
    expected[0] = 0
    assert torch.equal(engine.last_gates, expected)
    assert out['stats']['pruner_ms'] > 0 and out['stats']['gmacs_pruner'] > 0
    engine.set_runtime(runtime(gate_source='pruner', target_sparsity=0.5))
    out = engine.predict_action(obs)
    U = tiny_policy.transformer.num_units
    assert int((engine.last_gates != 0).sum()) == K * U - round(0.5 * K * U)
    engine.close()
