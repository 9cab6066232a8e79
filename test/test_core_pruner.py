"""Pruner shapes, exactness of its cheap evaluation, STE gradient flow, gate rules."""

from conftest import make_obs
import pytest
from sparse_policy_node.core.cache import FeatureCache
from sparse_policy_node.core.config import make_preset
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.flops import chunk_macs
from sparse_policy_node.core.gates import argmax_gates
from sparse_policy_node.core.gates import dial_gates
from sparse_policy_node.core.gates import random_gates
from sparse_policy_node.core.gates import static_gates
from sparse_policy_node.core.gates import straight_through_gates
from sparse_policy_node.core.pruner import Pruner
from sparse_policy_node.core.sparse_sampler import sample_soft
import torch
import torch.nn.functional as F

PCFG = PrunerConfig(hidden_dim=32, n_head=4, dim_feedforward=64, dropout=0.0)


def naive_pruner(p, memory):
    """Per (sample, step) evaluation on the full memory, as the paper's pruner runs."""
    B, K, S, D = memory.shape
    m = p.memory_proj(memory.reshape(B * K, S, D))  # (B K, T_c, H)
    q = p.queries[None].expand(B * K, -1, -1)
    U = q.shape[1]
    z = q + p.self_attn.self_attend(p.norm1(q), torch.zeros(U, U))
    kv = p.cross_attn.memory_kv(m)
    z = z + p.cross_attn.cross_attend(p.norm2(z), kv, torch.zeros(U, S))
    z = z + p.linear2(F.relu(p.linear1(p.norm3(z))))
    return p.head(z).reshape(B, K, U, 4)


def test_cheap_evaluation_equals_naive_per_step_evaluation(tiny_policy):
    torch.manual_seed(0)
    model = tiny_policy.transformer
    pruner = Pruner(PCFG, model.num_units, model.n_emb).eval()
    cond = tiny_policy.encode_obs(make_obs(tiny_policy, batch=3))
    steps = tiny_policy.scheduler.timesteps
    with torch.no_grad():
        time_mem, obs_mem = model.encode_condition_parts(steps, cond)
        logits = pruner(time_mem, obs_mem)
        expected = naive_pruner(pruner, model.assemble_memory(time_mem, obs_mem))
    assert logits.shape == (3, len(steps), model.num_units, 4)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_straight_through_gates_are_one_hot_and_pass_gradients_to_the_pruner(tiny_policy):
    torch.manual_seed(0)
    model = tiny_policy.transformer
    model.requires_grad_(False)
    pruner = Pruner(PCFG, model.num_units, model.n_emb).train()
    sched = tiny_policy.scheduler
    K, U = sched.num_steps, model.num_units
    cond = tiny_policy.encode_obs(make_obs(tiny_policy, batch=2)).detach()
    time_mem, obs_mem = model.encode_condition_parts(sched.timesteps, cond)
    kv_all = [(k.detach(), v.detach()) for k, v in model.memory_kv_all_steps(time_mem, obs_mem)]
    gates = straight_through_gates(pruner(time_mem.detach(), obs_mem.detach()),
                                   ('forward', 'timestep', 'rollout'))
    assert gates.shape == (2, K, U, 4)
    assert torch.equal(gates.detach().sum(-1), torch.ones(2, K, U))
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    assert (gates.detach()[:, 0, :, 0] == 1).all()
    cache = FeatureCache(U)
    cache.begin_chunk(('x',), K)
    # Pretend a previous chunk filled the rollout cache, so reuse gates matter.
    for k in range(K):
        for b in range(U):
            cache.rollout[k][b] = torch.randn(2, model.config.horizon, model.n_emb)
    out = sample_soft(model, sched, kv_all, torch.randn(2, 6, 7), gates, cache,
                      torch.randn(K, 2, 6, 7))
    loss = out.abs().mean() + (1 - gates[..., 0]).mean()
    loss.backward()
    grads = [p.grad for p in pruner.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in model.parameters())


def test_argmax_gates_force_step_zero_and_respect_directions():
    logits = torch.randn(5, 6, 4)
    logits[..., 3] += 10  # rollout strongly preferred
    gates = argmax_gates(logits, ('forward', 'timestep', 'rollout'))
    assert (gates[0] == 0).all() and (gates[1:] == 3).all()
    gates = argmax_gates(logits, ('forward',))
    assert set(gates[1:].unique().tolist()) <= {0, 1}


@pytest.mark.parametrize('sparsity', [0.0, 0.5, 0.8, 0.9, 0.93, 0.95, 0.97, 0.99])
def test_dial_keeps_exactly_the_requested_share(sparsity):
    K, U = 100, 24
    logits = torch.randn(K, U, 4, generator=torch.Generator().manual_seed(1))
    gates = dial_gates(logits, sparsity, ('forward', 'timestep', 'rollout'))
    kept = int((gates == 0).sum())
    assert kept == max(U, round((1 - sparsity) * K * U))
    assert (gates[0] == 0).all()
    # The kept entries of steps >= 1 are the ones with the highest compute preference.
    pref = logits[1:, :, 0] - logits[1:, :, 1:].max(-1).values
    kept_pref = pref[gates[1:] == 0]
    dropped_pref = pref[gates[1:] != 0]
    if len(kept_pref) and len(dropped_pref):
        assert kept_pref.min() >= dropped_pref.max()


def test_dial_reuses_from_the_best_allowed_direction():
    logits = torch.zeros(4, 3, 4)
    logits[..., 1] = 1.0
    logits[..., 2] = 2.0
    gates = dial_gates(logits, 0.75, ('forward', 'rollout'))
    assert set(gates[1:].unique().tolist()) == {1}


def test_static_and_random_baselines_match_sparsity():
    g = static_gates(100, 24, 0.93)
    assert (g[0] == 0).all()
    assert abs(float((g != 0).float().mean()) - 0.93) <= 0.01
    r = random_gates(100, 24, 0.93, ('timestep',), torch.Generator().manual_seed(0))
    assert float((r != 0).float().mean()) == pytest.approx(0.93, abs=1e-3)
    assert set(r.unique().tolist()) == {0, 2}


def test_pruner_costs_far_less_than_the_papers():
    cfg = make_preset('paper')
    t = cfg.transformer
    dense = chunk_macs(t, cfg.obs.obs_feature_dim, 100)
    paper_pruner = chunk_macs(t, cfg.obs.obs_feature_dim, 100, pruner=PrunerConfig(
        hidden_dim=512, n_head=8, dim_feedforward=1024))['pruner']
    ours = chunk_macs(t, cfg.obs.obs_feature_dim, 100, pruner=PrunerConfig())['pruner']
    # Dense DP-T over 100 steps: 7.88 "GFLOPs" (MACs) in the paper, which re-encodes the
    # memory and its cross-attention K/V at every step; ours does that once per schedule.
    assert 7.3e9 < dense['total'] < 7.88e9
    assert ours < 0.01 * dense['total']
    assert ours < paper_pruner / 10
