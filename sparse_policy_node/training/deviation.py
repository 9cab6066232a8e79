"""Action deviation of a variant from the dense policy, measured in the episode loop.

For every chunk the dense reference (the model's own sampler and K) is sampled on the
variant's observation window with the same random draws (initial noise, and DDPM variance
noise in the same order), and ``mean |a_variant - a_dense|`` is taken in the policy's
normalized action space (each dimension mapped to [-1, 1]). It is exactly 0 for the dense
variant; for a DDIM-K variant it measures how far the sampler departs from the model's own.
The reference costs a dense chunk per chunk and is excluded from ``chunk_ms``.
"""

import time
from typing import Dict
from typing import List

import numpy as np
from sparse_policy_node.core import keys
import torch


class DeviationProbe:
    """Wrap a policy-like variant; measure its actions against the dense reference.

    Per chunk: the global RNG state is saved, the variant samples its chunk (timed alone),
    the state is rewound and the dense reference (the model's own schedule) samples on the
    same observation window with the same draws, and the state is set to where the variant
    left it, so the episode's random stream is the variant's own.
    """

    def __init__(self, inner, policy):
        from sparse_policy_node.core.scheduler import NoiseScheduler
        self.inner = inner
        self.policy = policy
        sched = policy.config.scheduler
        self.scheduler = NoiseScheduler(sched)
        self.scheduler.set_timesteps(sched.num_inference_steps, sched.sampler)
        self.deviations: List[float] = []

    def reset(self) -> None:
        """Start a new episode: reset the variant and the per-episode deviations."""
        self.inner.reset()
        self.deviations = []

    @torch.no_grad()
    def reference(self, obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(1, n_action_steps, A) dense chunk, normalized, drawing from torch's global RNG."""
        from sparse_policy_node.core.sampler import initial_noise
        from sparse_policy_node.core.sampler import sample_dense
        policy = self.policy
        cond = policy.encode_obs(obs)
        noise = initial_noise(policy.action_shape(1), None, cond.device, cond.dtype)
        pred = sample_dense(policy.transformer, self.scheduler, cond, noise, None, None)
        return policy.chunk_from_prediction(pred)

    def predict_action(self, obs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Sample the variant's chunk; add ``chunk_ms`` (the variant alone), ``action_dev``."""
        before = torch.get_rng_state()
        t0 = time.perf_counter()
        out = self.inner.predict_action(obs)
        chunk_ms = (time.perf_counter() - t0) * 1e3
        after = torch.get_rng_state()
        torch.set_rng_state(before)
        ref = self.reference(obs)
        torch.set_rng_state(after)
        mine = self.policy.chunk_from_prediction(
            self.policy.normalizer.normalize(keys.ACTION, out['action_pred']))
        dev = float((mine - ref).abs().mean())
        self.deviations.append(dev)
        return dict(out, chunk_ms=chunk_ms, action_dev=dev)

    def episode_stats(self) -> dict:
        """Return the variant's statistics plus the episode's mean ``action_dev``."""
        stats = self.inner.episode_stats() if hasattr(self.inner, 'episode_stats') else {}
        if self.deviations:
            stats['action_dev'] = round(float(np.mean(self.deviations)), 5)
        return stats

    def close(self) -> None:
        """Close the variant."""
        if hasattr(self.inner, 'close'):
            self.inner.close()
