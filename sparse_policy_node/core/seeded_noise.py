"""Reproducible per-chunk noise: a pure function of (seed, observation stamp).

With a seed, the initial noise of a chunk and its DDPM variance noise are drawn from a CPU
generator seeded with :func:`chunk_seed` of the node's ``noise_seed`` and the chunk's
observation stamp (the stamp of the newest window step, which is also the stamp of the
published chunk). An offline engine run over the same observation windows therefore draws
the same noise without knowing anything else about the live run (how many chunks it
skipped, when it started), and the noise is the same on every device because it is always
drawn on the CPU.

Draw order, fixed: ``noise`` (1, T_a, A), then ``step_noise`` (K, 1, T_a, A) for DDPM
(DDIM uses no variance noise and draws none).
"""

import hashlib
from typing import Dict
from typing import Optional

import torch

UNSEEDED = -1


def chunk_seed(seed: int, stamp_ns: int) -> int:
    """Return the 63-bit generator seed of the chunk stamped ``stamp_ns`` under ``seed``.

    The first 8 bytes (little endian) of ``sha256(f'{seed}:{stamp_ns}')``, top bit cleared:
    neighbouring stamps get unrelated seeds, and any language can recompute it.
    """
    if seed < 0:
        raise ValueError(f'chunk_seed needs a seed >= 0, got {seed}')
    digest = hashlib.sha256(f'{int(seed)}:{int(stamp_ns)}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & (2 ** 63 - 1)


def draw_chunk_noise(seed: int, stamp_ns: int, action_shape, num_steps: int, ddpm: bool,
                     device='cpu', dtype=torch.float32) -> Dict[str, Optional[torch.Tensor]]:
    """Draw the noise of one chunk.

    Args:
        seed: the node's ``noise_seed`` (>= 0).
        stamp_ns: the chunk's observation stamp in nanoseconds.
        action_shape: (1, T_a, A) shape of the initial noise.
        num_steps: K, denoising steps of the chunk's schedule.
        ddpm: draw DDPM variance noise too.
        device: where the returned tensors live (drawn on the CPU either way).
        dtype: dtype of the returned tensors.

    Returns:
        ``noise`` (1, T_a, A) and ``step_noise`` (K, 1, T_a, A) or None: keyword arguments of
        :meth:`SparseEngine.predict_action`.
    """
    generator = torch.Generator().manual_seed(chunk_seed(seed, stamp_ns))
    shape = tuple(action_shape)
    noise = torch.randn(shape, generator=generator)  # (1, T_a, A)
    step_noise = None
    if ddpm:
        step_noise = torch.randn((int(num_steps), *shape), generator=generator)  # (K,1,T_a,A)
        step_noise = step_noise.to(device=device, dtype=dtype)
    return {'noise': noise.to(device=device, dtype=dtype), 'step_noise': step_noise}


def engine_chunk_noise(engine, seed: int, stamp_ns: int) -> Dict[str, Optional[torch.Tensor]]:
    """Draw the noise of the next chunk of ``engine`` under its runtime schedule.

    Returns ``{}`` when ``seed`` is :data:`UNSEEDED` (the engine then draws its own noise).
    """
    if seed < 0:
        return {}
    runtime = engine.runtime  # pending changes included: they apply to this chunk
    param = next(engine.policy.parameters())
    return draw_chunk_noise(seed, stamp_ns, engine.policy.action_shape(1),
                            runtime.num_inference_steps, runtime.sampler == 'ddpm',
                            engine.device, param.dtype)
