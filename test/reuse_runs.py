"""Chunks of every sparse path on the tiny policy, for the reuse-rules equivalence test.

``reuse_runs(policy)`` runs the batch-1 eager loop (random gates with cache aging, learned
gates, the sparsity dial; DDPM and DDIM), the batched soft path through the engine and
``sample_soft`` directly with reuse gates at step 0 and an aged rollout cache. Its outputs
were saved to ``test/artifacts/reuse_reference.pt`` at commit 354904c, before the rules were moved
into one module (``core/cache.py``); ``test_core_reuse.py`` compares today's outputs to it.

Regenerate only on purpose (when the rules are meant to change)::

    PYTHONPATH=. python test/reuse_runs.py test/artifacts/reuse_reference.pt
"""

import sys

from conftest import make_obs
from sparse_policy_node.core.cache import FeatureCache
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.config import tiny_config
from sparse_policy_node.core.engine import SparseEngine
from sparse_policy_node.core.policy import DiffusionPolicy
from sparse_policy_node.core.pruner import Pruner
from sparse_policy_node.core.sparse_sampler import sample_soft
import torch
import torch.nn.functional as F

CHUNKS = 5


def tiny_policy_and_pruner():
    """Return the tiny policy of ``conftest.tiny_policy`` and a reuse-leaning pruner."""
    torch.manual_seed(0)
    policy = DiffusionPolicy(tiny_config()).eval()
    torch.manual_seed(1)
    pruner = Pruner(PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32),
                    policy.transformer.num_units, policy.config.transformer.n_emb)
    with torch.no_grad():
        pruner.head.bias.copy_(torch.tensor([0.0, 0.5, 0.4, 0.6]))
    return policy, pruner.eval()


def engine_run(policy, pruner, batch=1, **knobs):
    """``CHUNKS`` chunks on new observations: action_pred (C, B, T_a, A), executed gates."""
    engine = SparseEngine(policy, pruner, RuntimeConfig(**knobs))
    gen = torch.Generator().manual_seed(7)
    preds, gates = [], []
    for c in range(CHUNKS):
        out = engine.predict_action(make_obs(policy, batch, 100 + c), generator=gen)
        preds.append(out['action_pred'])
        gates.append(engine.last_gates.reshape(batch, *engine.last_gates.shape[-2:]))
    engine.close()
    return torch.stack(preds), torch.stack(gates)


@torch.no_grad()
def soft_run(policy, max_age=1):
    """``sample_soft`` over ``CHUNKS`` chunks of B=2 with arbitrary one-hot gates (step 0 too)."""
    from sparse_policy_node.core.scheduler import NoiseScheduler
    model = policy.transformer
    sched = NoiseScheduler(policy.config.scheduler)
    sched.set_timesteps(10, 'ddpm')
    K, U = sched.num_steps, model.num_units
    cache = FeatureCache(U)
    g = torch.Generator().manual_seed(3)
    outs = []
    for c in range(CHUNKS):
        cond = policy.encode_obs(make_obs(policy, 2, 200 + c))
        time_mem, obs_mem = model.encode_condition_parts(sched.timesteps, cond)
        kv_all = model.memory_kv_all_steps(time_mem, obs_mem)
        dense = cache.begin_chunk(('soft',), K, max_age)
        choice = torch.zeros(2, K, U, dtype=torch.long) if dense else \
            torch.randint(0, 4, (2, K, U), generator=g)
        noise = torch.randn(2, 6, 7, generator=g)
        step_noise = torch.randn(K, 2, 6, 7, generator=g)
        outs.append(sample_soft(model, sched, kv_all, noise, F.one_hot(choice, 4).float(),
                                cache, step_noise))
    return torch.stack(outs)


def reuse_runs():
    """Every run's tensors by name."""
    policy, pruner = tiny_policy_and_pruner()
    runs = {
        'random_ddpm_age2': {'gate_source': 'random', 'target_sparsity': 0.8, 'sampler': 'ddpm',
                             'num_inference_steps': 10, 'rollout_max_age': 2},
        'random_ddim_age0': {'gate_source': 'random', 'target_sparsity': 0.7, 'sampler': 'ddim',
                             'num_inference_steps': 5},
        'learned_ddim': {'gate_source': 'pruner', 'sampler': 'ddim', 'num_inference_steps': 5},
        'dial_ddpm_age1': {'gate_source': 'pruner', 'target_sparsity': 0.8, 'sampler': 'ddpm',
                           'num_inference_steps': 10, 'rollout_max_age': 1},
    }
    out = {}
    for name, knobs in runs.items():
        out[name], out[name + '_gates'] = engine_run(policy, pruner, **knobs)
    out['batched_random_age1'], out['batched_random_age1_gates'] = engine_run(
        policy, pruner, batch=3, gate_source='random', target_sparsity=0.8, sampler='ddpm',
        num_inference_steps=10, rollout_max_age=1)
    out['soft_direct_age1'] = soft_run(policy)
    return out


if __name__ == '__main__':
    torch.set_num_threads(1)
    torch.save(reuse_runs(), sys.argv[1])
