"""Cache aging: rollout-slot ages and the max-age fallback, against a literal transcription.

The reference below is the rule of tts_method.md §6.2 written with dictionaries, plus aging
as documented in ``core/cache.py``: chunks are numbered from 0 since the rollout cache was
filled, a rollout slot remembers the chunk that wrote it, and a rollout reuse of a slot
written more than ``max_age`` chunks ago computes instead (``max_age = 0``: never expires).
"""

from conftest import make_obs
import pytest
from sparse_policy_node.core.cache import FeatureCache
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.gates import random_gates
from sparse_policy_node.core.sparse_sampler import sample_soft
from test_core_engine import FixedGates
from test_core_engine import K
from test_core_engine import make_noise
import torch
import torch.nn.functional as F


class AgingReference:
    """§6.2 with dictionaries, plus the max-age rule; returns outputs and executed choices."""

    def __init__(self, policy, max_age):
        self.policy = policy
        self.max_age = max_age
        self.rollout = {}  # (k, b) -> (value, chunk that wrote it)
        self.chunk_number = 0

    @torch.no_grad()
    def chunk(self, obs, noise, step_noise, gates, scheduler):
        model = self.policy.transformer
        cond = self.policy.encode_obs(obs)
        time_mem, obs_mem = model.encode_condition_parts(scheduler.timesteps, cond)
        kv_all = model.memory_kv_all_steps(time_mem, obs_mem)
        now = self.chunk_number
        forward, timestep, executed, reused_ages = {}, {}, [], []
        x_a = noise
        for k in range(scheduler.num_steps):
            x = model.embed_sample(x_a)
            row = []
            for b in range(model.num_units):
                layer, kind = divmod(b, 3)
                s = 0 if now == 0 or k == 0 else gates[k][b]
                d = None
                if s == 1:
                    d = forward.get(kind)
                elif s == 2:
                    d = timestep.get(b)
                elif s == 3 and (k, b) in self.rollout:
                    value, written = self.rollout[(k, b)]
                    age = now - written
                    if self.max_age == 0 or age <= self.max_age:
                        d = value
                        reused_ages.append(age)
                if d is None:
                    s = 0
                    k_all, v_all = kv_all[layer]
                    d = model.unit(layer, kind, x, kv=(k_all[:, k], v_all[:, k]))
                    forward[kind] = timestep[b] = d
                    self.rollout[(k, b)] = (d, now)
                row.append(s)
                x = x + d
            executed.append(row)
            x_a = scheduler.step(model.output(x), k, x_a, step_noise[k])
        self.chunk_number += 1
        return (self.policy.normalizer.unnormalize('action', x_a), torch.tensor(executed),
                reused_ages)


@pytest.mark.parametrize('max_age', [0, 1, 2])
def test_aging_matches_the_literal_transcription(tiny_policy, max_age):
    rt = RuntimeConfig(gate_source='random', target_sparsity=0.8, num_inference_steps=K,
                       rollout_max_age=max_age)
    engine = FixedGates(tiny_policy, None, rt)
    ref = AgingReference(tiny_policy, max_age)
    U = tiny_policy.transformer.num_units
    g = torch.Generator().manual_seed(1)
    expired_total = 0
    for chunk in range(6):
        obs = make_obs(tiny_policy, seed=chunk)
        noise, step_noise = make_noise(tiny_policy)
        gates = random_gates(K, U, 0.8, ('rollout', 'timestep'), g)
        engine.next_gates = gates
        out = engine.predict_action(obs, noise=noise, step_noise=step_noise)
        expected, executed, ages = ref.chunk(obs, noise, step_noise, gates.tolist(),
                                             engine.scheduler)
        assert torch.equal(out['action_pred'], expected), chunk
        assert torch.equal(engine.last_gates, executed), chunk
        st = out['stats']
        assert st['chunk_index'] == chunk and st['rollout_max_age'] == max_age
        assert st['rollout_age_max'] == max(ages, default=0)
        assert st['rollout_age_mean'] == pytest.approx(sum(ages) / len(ages) if ages else 0.0)
        if max_age:
            assert st['rollout_age_max'] <= max_age
        expired_total += st['rollout_expired']
    if max_age == 0:
        assert expired_total == 0
    if max_age == 1:
        assert expired_total > 0, 'some reuses must have expired with max age 1'


def test_a_never_computed_slot_is_refreshed_every_max_age_chunks(tiny_policy):
    # All-rollout gates: without aging every chunk replays the first chunk's features;
    # with max age 2, slot (k, b) is recomputed at chunks 3, 6, ... (written 0, 3, 6).
    U = tiny_policy.transformer.num_units
    gates = torch.full((K, U), 3, dtype=torch.long)
    obs = make_obs(tiny_policy)
    for max_age, refresh_chunks in ((0, []), (2, [3, 6])):
        engine = FixedGates(tiny_policy, None, RuntimeConfig(
            gate_source='random', target_sparsity=0.9, num_inference_steps=K,
            rollout_max_age=max_age))
        engine.next_gates = gates
        refreshed = []
        for chunk in range(8):
            engine.predict_action(obs)
            if chunk and bool((engine.last_gates[1:] == 0).all()):
                refreshed.append(chunk)
            ages = engine.cache.rollout_ages()
            assert max(ages) == (chunk if max_age == 0 else chunk % (max_age + 1))
        assert refreshed == refresh_chunks


def test_soft_path_ages_equal_hard_path(tiny_policy):
    # Batched training path with per-sample ages gives the hard path's outputs.
    U = tiny_policy.transformer.num_units
    engine = FixedGates(tiny_policy, None, RuntimeConfig(
        gate_source='random', target_sparsity=0.8, num_inference_steps=K, rollout_max_age=1))
    soft_cache = FeatureCache(U)
    g = torch.Generator().manual_seed(0)
    expired = 0
    for chunk in range(5):
        obs = make_obs(tiny_policy, seed=chunk)
        noise, step_noise = make_noise(tiny_policy)
        gates = random_gates(K, U, 0.8, ('rollout',), g)
        engine.next_gates = gates
        hard = engine.predict_action(obs, noise=noise, step_noise=step_noise)
        first = soft_cache.begin_chunk(('x',), K, max_age=1)
        used = torch.zeros_like(gates) if first else gates.clone()
        used[0] = 0
        with torch.no_grad():
            model = tiny_policy.transformer
            cond = tiny_policy.encode_obs(obs)
            obs_mem = model.encode_obs_tokens(cond)
            time_mem = model.encode_time_tokens(engine.scheduler.timesteps)
            kv_all = model.assemble_kv(model.time_kv(time_mem), model.obs_kv(obs_mem))
            soft, compute = sample_soft(model, engine.scheduler, kv_all, noise,
                                        F.one_hot(used[None], 4).float(), soft_cache,
                                        step_noise, return_compute=True)
        soft = tiny_policy.normalizer.unnormalize('action', soft)
        assert torch.allclose(soft, hard['action_pred'], atol=1e-5), chunk
        # The soft path's compute is what the hard path ran, expiries included.
        ran = (engine.last_gates == 0).float()  # (K, U)
        assert torch.equal(compute[0], ran), chunk
        if chunk >= 2:  # slots of chunk c - 2 have expired: more ran than the gates chose
            expired += int(ran.sum() - (used == 0).sum())
    assert expired > 0


def test_soft_path_keeps_ages_per_sample():
    cache = FeatureCache(3)
    cache.begin_chunk(('s',), 1, max_age=1)  # chunk 0 fills the slots
    for b in range(3):
        cache.store(0, b, torch.zeros(2, 1, 1))
    cache.written[0][1] = torch.tensor([0, 0])
    cache.begin_chunk(('s',), 1, max_age=1)
    cache.begin_chunk(('s',), 1, max_age=1)  # chunk 2: the slots are 2 chunks old
    cache.written[0][1] = torch.tensor([2, 0])  # sample 0 refreshed it this chunk
    assert cache.rollout_age(0, 1).tolist() == [0, 2]
    assert cache.rollout_age(0, 0) == 2 and not cache.rollout_fresh(0, 0)
    cache.narrow_(1)
    assert cache.written[0][1].tolist() == [2]


def test_max_age_is_validated():
    with pytest.raises(ConfigError, match='rollout_max_age'):
        RuntimeConfig(rollout_max_age=-1)
    with pytest.raises(ConfigError, match='rollout_max_age'):
        RuntimeConfig(rollout_max_age=1.5)
    with pytest.raises(ValueError, match='max_age'):
        FeatureCache(3).begin_chunk(('s',), 1, max_age=-2)
