"""Dense denoising loop: the reference the sparse engine must reproduce bit for bit.

The condition memory of all K steps, and the cross-attention keys/values derived from it, are
computed in one batched pass (exact, since the memory does not depend on the noisy action);
every step then runs all units of the decoder.
"""

from typing import Optional

from sparse_policy_node.core.scheduler import NoiseScheduler
from sparse_policy_node.core.transformer import DPTransformer
import torch


def initial_noise(shape, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    """Draw standard normal (B, T_a, A) noise drawn on the generator's device."""
    gen_device = generator.device if generator is not None else 'cpu'
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def device_generator(device: torch.device, generator: Optional[torch.Generator],
                     scratch: Optional[torch.Generator] = None) -> torch.Generator:
    """Return a generator that draws on ``device`` and follows ``generator``'s state.

    A generator already on ``device`` is returned as is. Otherwise ``scratch`` (a generator
    on ``device``, created when None) is reseeded with one 62-bit integer drawn on the host
    from ``generator``, or from torch's global generator when it is None, so a run seeded with
    ``torch.manual_seed`` (as evaluation does) draws the same device noise every time. The
    draw is a host-only op: no device synchronisation.
    """
    if generator is not None and generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    if scratch is None:
        scratch = torch.Generator(device)
    return scratch.manual_seed(seed)


def chunk_noise(shape, num_steps: int, ddpm: bool, generator: torch.Generator,
                dtype=torch.float32):
    """Draw the initial noise and all DDPM variance noise of one chunk, before the loop.

    Both are drawn on ``generator``'s device in one go, so a CUDA loop never waits on a host
    copy (a per-step draw on the host and copy to the device stalls every step).

    Returns:
        noise (B, T_a, A) and step_noise (K, B, T_a, A), or None for DDIM.
    """
    dev = generator.device
    noise = torch.randn(shape, generator=generator, device=dev, dtype=dtype)
    if not ddpm:
        return noise, None
    return noise, torch.randn((num_steps, *shape), generator=generator, device=dev,
                              dtype=dtype)


def compute_unit(model: DPTransformer, unit: int, x: torch.Tensor, kv_all: list,
                 step: int) -> torch.Tensor:
    """Branch output of unit ``b = 3 l + j`` at denoising step ``step``.

    Args:
        model: the transformer.
        unit: flattened unit index b.
        x: (B, T_a, D) residual stream before the unit.
        kv_all: per layer memory (k, v) of every step (``memory_kv_all_steps``).
        step: denoising step index k (selects the cross-attention memory).

    Returns:
        (B, T_a, D) branch output, not yet added to ``x``.
    """
    layer, kind = model.layers[unit // 3], unit % 3
    if kind == 0:
        return layer.sa(x, model.mask)
    if kind == 1:
        k, v = kv_all[unit // 3]
        return layer.ca(x, (k[:, step], v[:, step]), model.memory_mask)
    return layer.ffn(x)


def dense_step(model: DPTransformer, sample: torch.Tensor, kv_all: list,
               step: int) -> torch.Tensor:
    """One dense denoiser call on precomputed memory keys/values.

    Args:
        model: the transformer.
        sample: (B, T_a, A) noisy normalized actions.
        kv_all: per layer (k, v) of every step (:meth:`DPTransformer.memory_kv_all_steps`).
        step: denoising step index k.

    Returns:
        (B, T_a, A) predicted noise.
    """
    x = model.embed_sample(sample.to(model.pos_emb.dtype))  # no-op unless reduced precision
    for b in range(model.num_units):
        x = x + compute_unit(model, b, x, kv_all, step)
    return model.output(x).to(sample.dtype)


@torch.no_grad()
def sample_dense(model: DPTransformer, scheduler: NoiseScheduler, cond: torch.Tensor,
                 noise: torch.Tensor, step_noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Run the full reverse diffusion with every unit computed.

    Args:
        model: the transformer (eval mode).
        scheduler: scheduler with its inference timesteps set.
        cond: (B, T_o, D_o) observation features.
        noise: (B, T_a, A) initial noise.
        step_noise: optional (K, B, T_a, A) DDPM variance noise per step.
        generator: draws the variance noise when ``step_noise`` is None.

    Returns:
        (B, T_a, A) denoised normalized actions.
    """
    time_mem, obs_mem = model.encode_condition_parts(scheduler.timesteps, cond)
    kv_all = model.memory_kv_all_steps(time_mem, obs_mem)
    x = noise
    for k in range(scheduler.num_steps):
        eps = dense_step(model, x, kv_all, k)
        x = scheduler.step(eps, k, x, None if step_noise is None else step_noise[k], generator)
    return x
