"""The reuse rules live once (``core/cache.py``): every path against it and against the past.

* Today's chunks of every sparse path equal the ones saved before the rules were moved into
  one module (``test/artifacts/reuse_reference.pt``, made by ``test/reuse_runs.py`` at commit
  354904c). One entry was updated since, on purpose: ``batched_random_age1_gates``, when
  the batched path began to report the choices that ran (109 rollout reuses whose slot had
  expired now read compute, as the host path has always reported them; actions unchanged).
* :func:`chunk_plan` (the whole-chunk device form) gives the executed choices and the very
  cached values of the per-unit host form (:meth:`FeatureCache.source` / ``store``), over
  random gate maps, rollout states and max ages.
* The step graphs' body (:class:`StepGraphs`, eager on the CPU) equals the eager loop.
"""

import os

import pytest
from reuse_runs import reuse_runs
from sparse_policy_node.core.cache import advance_rollout
from sparse_policy_node.core.cache import chunk_plan
from sparse_policy_node.core.cache import COMPUTE
from sparse_policy_node.core.cache import FeatureCache
from sparse_policy_node.core.cache import REUSE_ROLLOUT
from sparse_policy_node.core.cache import RolloutAgeStats
from sparse_policy_node.core.cuda_graphs import StepGraphs
from sparse_policy_node.core.sparse_sampler import sample_sparse
import torch

REFERENCE = os.path.join(os.path.dirname(__file__), 'artifacts', 'reuse_reference.pt')


def test_every_path_equals_the_chunks_saved_before_the_rules_moved():
    saved = torch.load(REFERENCE)
    now = reuse_runs()
    assert sorted(now) == sorted(saved)
    for name, value in saved.items():
        if name.endswith('_gates'):
            assert torch.equal(now[name], value), name
        else:
            assert torch.allclose(now[name], value, atol=1e-5, rtol=0), name
    # the runs exercise reuse of every kind and expired rollout slots
    executed = torch.cat([v.flatten() for k, v in saved.items() if k.endswith('_gates')])
    assert set(executed.unique().tolist()) == {0, 1, 2, 3}


def _host_chunk(cache: FeatureCache, gates, K: int, U: int):
    # The per-unit rules with a sentinel value per computed (k, b): returns the executed map,
    # the sentinel each unit added, and the age statistics.
    executed, added, ages = [], [], RolloutAgeStats()
    for k in range(K):
        row, vals = [], []
        for b in range(U):
            choice = COMPUTE if k == 0 else int(gates[k, b])
            d = cache.source(choice, k, b, ages)
            if d is None:
                d = torch.tensor(float(k * U + b))  # "computed": the value names its slot
                cache.store(k, b, d)
                choice = COMPUTE
            row.append(choice)
            vals.append(d)
        executed.append(row)
        added.append(vals)
    return torch.tensor(executed), added, ages


@pytest.mark.parametrize('max_age', [0, 1, 2])
def test_chunk_plan_follows_the_per_unit_rules(max_age):
    K, U = 6, 9
    g = torch.Generator().manual_seed(max_age)
    cache = FeatureCache(U)
    filled = torch.zeros(K, U, dtype=torch.bool)
    written = torch.zeros(K, U, dtype=torch.long)
    # the store: what the rollout slot n = k U + b holds (the sentinel of the chunk that
    # computed it, chunk-tagged so that stale values are told apart)
    store = torch.full((K * U,), -1.0)
    kinds = set()
    for chunk in range(8):
        dense = cache.begin_chunk(('plan',), K, max_age)
        gates = torch.zeros(K, U, dtype=torch.long) if dense else \
            torch.randint(0, 4, (K, U), generator=g)
        if chunk % 3 == 2:
            gates[1:] = REUSE_ROLLOUT  # many rollout reuses: expiries
        executed, added, ages = _host_chunk(cache, gates, K, U)
        plan = chunk_plan(gates, filled, written, torch.tensor(cache.chunk),
                          torch.tensor(max_age))
        assert torch.equal(plan['executed'], executed), chunk
        assert torch.equal(plan['compute'], executed == COMPUTE)
        # the plan's sources hold what the host form added, value for value
        for k in range(K):
            for b in range(U):
                n = k * U + b
                if plan['compute'][k, b]:
                    store[n] = float(n) + 1000 * chunk
                value = float(store[int(plan['source'][k, b])])
                assert value % 1000 == float(added[k][b]), (chunk, k, b)
                if executed[k, b] == REUSE_ROLLOUT:
                    assert value // 1000 == chunk - int(cache.rollout_age(k, b))
        plan_ages = RolloutAgeStats()
        plan_ages.add_plan(plan)
        assert plan_ages.as_dict() == ages.as_dict()
        advance_rollout(plan, filled, written, torch.tensor(cache.chunk))
        kinds.update(executed.unique().tolist())
        assert filled.all()
        assert written.tolist() == cache.written
    assert kinds == {0, 1, 2, 3}


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_step_graph_body_equals_the_eager_loop(tiny_policy, sampler):
    # StepGraphs on the CPU runs its (step, pattern) bodies eagerly on its static buffers.
    from sparse_policy_node.core.scheduler import NoiseScheduler
    from conftest import make_obs
    model = tiny_policy.transformer
    sched = NoiseScheduler(tiny_policy.config.scheduler)
    sched.set_timesteps(8, sampler)
    K, U = sched.num_steps, model.num_units
    g = torch.Generator().manual_seed(0)
    eager, graphs = FeatureCache(U), FeatureCache(U)
    step_graphs = None
    with torch.no_grad():
        for chunk in range(5):
            cond = tiny_policy.encode_obs(make_obs(tiny_policy, seed=chunk))
            time_mem, obs_mem = model.encode_condition_parts(sched.timesteps, cond)
            kv_all = model.memory_kv_all_steps(time_mem, obs_mem)
            noise = torch.randn(1, 6, 7, generator=g)
            step_noise = torch.randn(K, 1, 6, 7, generator=g) if sampler == 'ddpm' else None
            rows = torch.randint(0, 4, (K, U), generator=g).tolist()
            dense = eager.begin_chunk(('s',), K, 2)
            graphs.begin_chunk(('s',), K, 2)
            fn = None if dense else (lambda: rows)
            a, ran_a = sample_sparse(model, sched, kv_all, noise, fn, eager, step_noise)
            if step_graphs is None:
                step_graphs = StepGraphs(model, sched, kv_all, noise, step_noise)
            b, ran_b = step_graphs.run(kv_all, noise, step_noise, fn, graphs)
            assert ran_a == ran_b, chunk
            assert torch.allclose(a, b, atol=1e-6), chunk
    assert step_graphs.captures == 0
