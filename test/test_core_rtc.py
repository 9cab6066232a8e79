"""Real-time chunking: the paper's soft weights, an exact inpainted prefix, sparse = dense."""

import math

from conftest import make_obs
import numpy as np
import pytest
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.engine import SparseEngine
from sparse_policy_node.core.rtc import Inpainter
from sparse_policy_node.core.rtc import Prefix
from sparse_policy_node.core.rtc import prefix_from
from sparse_policy_node.core.rtc import rtc_weights
from sparse_policy_node.core.sampler import sample_dense
from sparse_policy_node.ros import execution as ex
import torch

K = 6


def paper_weights(H, s, d):
    """Literal transcription of Black et al. 2025, eq. 5 (soft masking of the prefix)."""
    W = []
    for i in range(H):
        c = (H - s - i) / (H - s - d + 1)
        if i < d:
            W.append(1.0)
        elif d <= i < H - s:
            W.append(c * (math.e ** c - 1) / (math.e - 1))
        else:
            W.append(0.0)
    return W


@pytest.mark.parametrize('H', [4, 8, 16])
def test_soft_weights_equal_the_papers_formula(H):
    for s in range(0, H + 1):
        for d in range(0, H - s + 1):
            got = rtc_weights(H, d, H - s)
            assert got.tolist() == pytest.approx(paper_weights(H, s, d), abs=1e-7), (H, s, d)


def test_soft_weights_decay_from_one_to_zero_over_the_overlap():
    w = rtc_weights(8, 2, 6).tolist()
    assert w[:2] == [1.0, 1.0] and w[6:] == [0.0, 0.0]
    assert all(a > b > 0 for a, b in zip(w[1:5], w[2:6]))


@pytest.mark.parametrize('args', [(8, 3, 2), (8, -1, 4), (8, 2, 9)])
def test_soft_weights_refuse_an_impossible_overlap(args):
    with pytest.raises(ValueError, match='rtc weights'):
        rtc_weights(*args)


def engine_for(policy, sampler, **kwargs):
    return SparseEngine(policy, None, RuntimeConfig(sampler=sampler, num_inference_steps=K,
                                                    **kwargs))


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_pinned_prefix_equals_the_committed_actions_exactly(tiny_policy, sampler):
    # Normalized space, dense reference loop: the last step ends at noise level 0, where a
    # pinned step is the committed action itself, whatever the (zero or random) noise.
    sched = tiny_policy.scheduler
    sched.set_timesteps(K, sampler)
    cond = tiny_policy.encode_obs(make_obs(tiny_policy))
    B, T_a, A = tiny_policy.action_shape(1)
    target = torch.rand(B, T_a, A) * 2 - 1
    weights = torch.zeros(T_a)
    weights[1:4] = 1.0
    for noise_scale in (0.0, 1.0):
        noise = torch.randn(B, T_a, A) * noise_scale
        step_noise = torch.randn(K, B, T_a, A) * noise_scale
        inpaint = Inpainter(target, weights)
        sched.inpaint = inpaint
        try:
            x = sample_dense(tiny_policy.transformer, sched, cond,
                             inpaint.start(noise, sched.alpha_bar_start), step_noise)
        finally:
            sched.inpaint = None
        assert torch.equal(x[:, 1:4], target[:, 1:4])
        assert not torch.equal(x[:, 4:], target[:, 4:])


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_engine_chunk_starts_with_the_committed_actions(tiny_policy, sampler):
    engine = engine_for(tiny_policy, sampler, sparsity_enabled=False)
    obs = make_obs(tiny_policy)
    first = engine.predict_action(obs)['action']           # (1, n, A)
    n = first.shape[1]                                     # 4 in the tiny config
    committed = first[0, 1:].numpy()                       # 3 steps still to run
    prefix = prefix_from(committed, 2, n)
    assert prefix.weights.tolist()[:2] == [1.0, 1.0] and 0 < prefix.weights[2] < 1
    out = engine.predict_action(make_obs(tiny_policy, seed=1), prefix=prefix)['action']
    # Exact in normalized space; unnormalizing adds float rounding only.
    assert torch.allclose(out[0, :2], first[0, 1:3], atol=1e-6, rtol=0)
    free = engine.predict_action(make_obs(tiny_policy, seed=1))['action']
    assert (out[0, :2] - free[0, :2]).abs().max() > 1e-3


def test_zero_weights_change_nothing(tiny_policy):
    engine = engine_for(tiny_policy, 'ddim', sparsity_enabled=False)
    obs = make_obs(tiny_policy)
    noise = torch.randn(tiny_policy.action_shape(1))
    n = tiny_policy.config.n_action_steps
    prefix = Prefix(torch.randn(1, n, tiny_policy.config.transformer.action_dim),
                    torch.zeros(n))
    a = engine.predict_action(obs, noise=noise.clone())['action_pred']
    b = engine.predict_action(obs, noise=noise.clone(), prefix=prefix)['action_pred']
    assert torch.equal(a, b)


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_sparse_rtc_equals_dense_rtc_when_every_gate_computes(tiny_policy, sampler):
    dense = engine_for(tiny_policy, sampler, sparsity_enabled=False)
    sparse = engine_for(tiny_policy, sampler, gate_source='random', target_sparsity=0.5)
    U = tiny_policy.transformer.num_units
    t = tiny_policy.config.transformer
    n = tiny_policy.config.n_action_steps
    for chunk in range(3):  # chunk 0 is dense by rule; 1 and 2 run the gated loop
        obs = make_obs(tiny_policy, seed=chunk)
        noise = torch.randn(1, t.horizon, t.action_dim)
        step_noise = torch.randn(K, 1, t.horizon, t.action_dim)
        prefix = prefix_from(np.random.default_rng(chunk).uniform(-1, 1, (3, t.action_dim)),
                             2, n)
        a = dense.predict_action(obs, noise=noise, step_noise=step_noise, prefix=prefix)
        b = sparse.predict_action(obs, noise=noise, step_noise=step_noise, prefix=prefix,
                                  gates=torch.zeros(K, U, dtype=torch.long))
        assert b['stats']['dense'] == (chunk == 0)
        assert torch.equal(a['action_pred'], b['action_pred'])


def test_prefix_must_fit_the_chunk(tiny_policy):
    engine = engine_for(tiny_policy, 'ddim', sparsity_enabled=False)
    prefix = Prefix(torch.zeros(1, 3, 99), torch.ones(3))
    with pytest.raises(ValueError, match='do not fit'):
        engine.predict_action(make_obs(tiny_policy), prefix=prefix)
    with pytest.raises(ValueError, match=r'\(B, m, A\)'):
        Prefix(torch.zeros(3, 7), torch.ones(3))


def test_executor_hands_out_what_will_still_run():
    dt = 50
    execu = ex.ChunkExecutor(ex.DELTA, dt, 'rtc')
    values = np.arange(8.0)[:, None] * np.ones((1, 7))
    execu.add(0, values, 0, base=0)
    for k in range(3):
        execu.tick(k * dt)
    committed = execu.committed(3 * dt, base=execu.sent)   # steps 3..7 still to run
    assert committed[:, 0].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert prefix_from(None, 2, 8) is None
    prefix = prefix_from(committed, 2, 8)
    assert prefix.actions.shape == (1, 5, 7)
    assert prefix.weights.tolist() == pytest.approx(rtc_weights(8, 2, 5)[:5].tolist())


def test_rtc_mode_replaces_from_the_first_pending_step():
    dt = 50
    execu = ex.ChunkExecutor(ex.DELTA, dt, 'rtc')
    execu.add(0, np.zeros((8, 7)), 0, base=0)
    for k in range(4):
        execu.tick(k * dt)
    values, first = execu.add(2 * dt, np.ones((8, 7)), 4 * dt, base=2)
    assert first == 2 and np.array_equal(values, np.ones((8, 7)))
    with pytest.raises(ValueError, match='blend_steps'):
        ex.ChunkExecutor(ex.DELTA, dt, 'rtc', blend_steps=2)
