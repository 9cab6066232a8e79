"""Cost of RTC guidance against replacement: one denoiser call with and without a VJP.

Guidance (Black et al. 2025) needs the gradient of a prefix error with respect to the noisy
sample at every denoising step: a backward pass through the denoiser. This times one dense
denoiser call of a model (no_grad, as replacement inpainting runs) against the same call
followed by ``torch.autograd.grad`` (as guidance would), interleaved, median of 40 each.

Run from the repository root: ``python docs/rtc_guidance_cost.py [models/lift]``.
"""

import sys
import time

import numpy as np
from sparse_policy_node.core.engine import load_engine
from sparse_policy_node.core.sampler import dense_step
import torch


def main(model_dir: str = 'models/lift') -> None:
    torch.set_num_threads(1)
    engine = load_engine(model_dir)
    policy, model, sched = engine.policy, engine.policy.transformer, engine.scheduler
    obs = {k: torch.zeros((1, *shape), dtype=torch.uint8 if k.endswith('_image')
                          else torch.float32)
           for k, shape in policy.expected_obs_shapes().items()}
    with torch.no_grad():
        cond = policy.encode_obs(obs)
        kv = model.memory_kv_all_steps(*model.encode_condition_parts(sched.timesteps, cond))
    x = torch.randn(policy.action_shape(1))

    def replacement():
        with torch.no_grad():
            return dense_step(model, x, kv, 1)

    def guidance():
        xx = x.clone().requires_grad_(True)
        eps = dense_step(model, xx, kv, 1)
        x0 = xx * 2.0 - eps          # any x0 estimate that depends on eps
        return torch.autograd.grad((x0 ** 2).sum(), xx)[0]

    replacement(), guidance()
    times = {'replacement': [], 'guidance': []}
    for _ in range(40):
        for name, fn in (('replacement', replacement), ('guidance', guidance)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    a, b = (1e3 * float(np.median(times[k])) for k in ('replacement', 'guidance'))
    print(f'denoiser call {a:.2f} ms, with the VJP of guidance {b:.2f} ms ({b / a:.2f}x)')


if __name__ == '__main__':
    main(*sys.argv[1:])
