"""Sparse denoising loops: a truly skipping batch-1 loop and a batched soft-gated twin.

Per unit b = 3 l + j at step k (tts_method.md §6.2)::

    choice C: d = f_b(LN_j(x)); x = x + d; refresh F[j], T[b], R[k][b] with d
    choice F: x = x + F[j]        choice T: x = x + T[b]        choice R: x = x + R[k][b]

A reuse whose slot is empty, or a rollout reuse whose slot is older than the cache's
``max_age`` chunks (see :mod:`cache`), computes instead.

:func:`sample_sparse` branches in Python per unit, so a reused unit costs one tensor add and
no kernel of the unit runs at all (no compute-then-mask). With every gate set to compute it
executes exactly the operations of :func:`sampler.dense_step`, hence identical bits.

:func:`sample_soft` is the batched, differentiable path used for training and batched
evaluation: it always computes and mixes ``x + g_C d + g_F F + g_T T + g_R R`` with one-hot
(straight-through) gates, refreshing the caches per sample where ``g_C = 1``. Its outputs
equal the hard path's for the same gates.
"""

from typing import Callable
from typing import List
from typing import Optional

from sparse_policy_node.core.cache import COMPUTE
from sparse_policy_node.core.cache import FeatureCache
from sparse_policy_node.core.cache import RolloutAgeStats  # noqa: F401 (re-exported)
from sparse_policy_node.core.cache import soft_mix
from sparse_policy_node.core.sampler import compute_unit
from sparse_policy_node.core.scheduler import NoiseScheduler
from sparse_policy_node.core.transformer import DPTransformer
import torch

GateRows = List[List[int]]


def sparse_step(model: DPTransformer, sample: torch.Tensor, kv_all: list,
                gates: Optional[List[int]], cache: FeatureCache, step: int,
                executed: List[int], ages: Optional[RolloutAgeStats] = None) -> torch.Tensor:
    """One batch-1 denoiser call that skips reused units.

    Args:
        model: the transformer (eval mode).
        sample: (1, T_a, A) noisy normalized actions.
        kv_all: per layer memory (k, v) of every step (``memory_kv_all_steps``).
        gates: U choices for this step, or None to compute every unit.
        cache: feature caches, updated in place.
        step: denoising step index k.
        executed: U ints, overwritten with the choices actually executed (a reuse whose cache
            slot is empty, or a rollout slot older than ``cache.max_age``, falls back to
            compute).
        ages: optional accumulator of the ages of reused rollout slots.

    Returns:
        (1, T_a, A) predicted noise.
    """
    # The scheduler works in float32; the denoiser in its own dtype (see
    # RuntimeConfig.precision). Both casts are no-ops (no kernel) in float32.
    x = model.embed_sample(sample.to(model.pos_emb.dtype))
    for b in range(len(executed)):
        choice = COMPUTE if gates is None else gates[b]
        d = cache.source(choice, step, b, ages)  # None: compute (see FeatureCache.source)
        if d is None:
            d = compute_unit(model, b, x, kv_all, step)
            cache.store(step, b, d)
            choice = COMPUTE
        executed[b] = choice
        x += d  # x is this step's own residual stream (no cache holds it): add in place
    return model.output(x).to(sample.dtype)


@torch.no_grad()
def sample_sparse(model: DPTransformer, scheduler: NoiseScheduler, kv_all: list,
                  noise: torch.Tensor, gates_fn: Optional[Callable[[], GateRows]],
                  cache: FeatureCache, step_noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None,
                  ages: Optional[RolloutAgeStats] = None):
    """Reverse diffusion at batch 1 with per-(step, unit) gates.

    Step 0 always computes every unit; ``gates_fn`` is called once, just before step 1, so
    that gates can be produced concurrently with step 0 (see :mod:`engine`).

    Args:
        model: the transformer (eval mode).
        scheduler: scheduler with its inference timesteps set.
        kv_all: per layer memory (k, v) of every step (``memory_kv_all_steps``).
        noise: (1, T_a, A) initial noise.
        gates_fn: returns K rows of U choices; None computes everything.
        cache: feature caches; :meth:`FeatureCache.begin_chunk` must have been called.
        step_noise: optional (K, 1, T_a, A) DDPM variance noise.
        generator: draws variance noise when ``step_noise`` is None.
        ages: optional accumulator of the ages of reused rollout slots.

    Returns:
        x: (1, T_a, A) denoised normalized actions.
        executed: K rows of U executed choices.
    """
    K, U = scheduler.num_steps, model.num_units
    executed = [[0] * U for _ in range(K)]
    x = noise
    gates = None
    for k in range(K):
        if k == 1 and gates_fn is not None:
            gates = gates_fn()
        eps = sparse_step(model, x, kv_all, None if k == 0 or gates is None else gates[k],
                          cache, k, executed[k], ages)
        x = scheduler.step(eps, k, x, None if step_noise is None else step_noise[k], generator)
    return x, executed


def sample_soft(model: DPTransformer, scheduler: NoiseScheduler, kv_all: list,
                noise: torch.Tensor, gates: torch.Tensor, cache: FeatureCache,
                step_noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, return_compute: bool = False):
    """Batched reverse diffusion with soft (one-hot valued) gates; differentiable in ``gates``.

    Every unit is computed for every sample; caches are refreshed per sample where the compute
    gate is 1 and are stored detached, so gradients flow through the residual stream across
    units and steps but not through cached values.

    Args:
        model: the transformer (its parameters may be frozen).
        scheduler: scheduler with its inference timesteps set.
        kv_all: per layer memory (k, v) of every step (``memory_kv_all_steps``).
        noise: (B, T_a, A) initial noise.
        gates: (B, K, U, 4) one-hot valued gates (straight-through in training).
        cache: feature caches holding (B, T_a, D) tensors; begin_chunk must have been called.
        step_noise: optional (K, B, T_a, A) DDPM variance noise.
        generator: draws variance noise when ``step_noise`` is None.
        return_compute: also return what ran: the (B, K, U) compute weight of every unit,
            1 where the gate chose compute *or* chose a candidate that was empty or expired
            (the fallbacks), differentiable in ``gates``. Its mean is the compute the chunk
            really does, which the gates alone overstate when slots expire.

    Returns:
        (B, T_a, A) denoised normalized actions; with ``return_compute``, the pair
        (actions, compute).
    """
    K, U = scheduler.num_steps, model.num_units
    x_a = noise
    compute = []
    for k in range(K):
        x = model.embed_sample(x_a.to(model.pos_emb.dtype))
        for b in range(U):
            d = compute_unit(model, b, x, kv_all, k)
            x, g_compute = soft_mix(x, d, gates[:, k, b], cache.soft_candidates(k, b),
                                    cache.rollout_fresh_mask(k, b, x.shape[0]))
            cache.store_where(k, b, d.detach(), g_compute > 0.5)
            compute.append(g_compute)
        eps = model.output(x).to(x_a.dtype)
        x_a = scheduler.step(eps, k, x_a, None if step_noise is None else step_noise[k],
                             generator)
    if return_compute:
        return x_a, torch.stack(compute, dim=1).reshape(-1, K, U)
    return x_a
