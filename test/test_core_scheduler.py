"""Schedulers agree numerically with diffusers' DDPMScheduler / DDIMScheduler definitions."""

import pytest
from sparse_policy_node.core.config import SchedulerConfig
from sparse_policy_node.core.scheduler import NoiseScheduler
import torch

diffusers = pytest.importorskip('diffusers')


def reference(kind):
    common = {'num_train_timesteps': 100, 'beta_start': 0.0001, 'beta_end': 0.02,
              'beta_schedule': 'squaredcos_cap_v2', 'clip_sample': True,
              'prediction_type': 'epsilon'}
    if kind == 'ddpm':
        return diffusers.DDPMScheduler(variance_type='fixed_small', **common)
    return diffusers.DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **common)


@pytest.mark.parametrize('kind, steps', [('ddpm', 100), ('ddpm', 10), ('ddim', 10),
                                         ('ddim', 40), ('ddim', 100)])
def test_matches_diffusers_step_by_step(kind, steps):
    ref = reference(kind)
    ref.set_timesteps(steps)
    ours = NoiseScheduler(SchedulerConfig(sampler=kind, num_inference_steps=steps))
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(2, 10, 7, generator=g) * 3
    for i, t in enumerate(ref.timesteps):
        eps = torch.randn(2, 10, 7, generator=g)
        noise = torch.randn(2, 10, 7, generator=g)
        # diffusers draws its DDPM variance noise from the generator: feed the same noise.
        gen = torch.Generator().manual_seed(i)
        x_ref = ref.step(eps, t, x_ref, generator=gen).prev_sample
        noise = torch.randn(2, 10, 7, generator=torch.Generator().manual_seed(i))
        x_ours = ours.step(eps, i, x_ours, noise=noise)
        assert torch.allclose(x_ours, x_ref, atol=1e-5, rtol=1e-5), (kind, steps, i)


def test_add_noise_matches_diffusers():
    ref = reference('ddpm')
    ours = NoiseScheduler(SchedulerConfig())
    x0, noise = torch.randn(4, 10, 7), torch.randn(4, 10, 7)
    t = torch.tensor([0, 10, 50, 99])
    assert torch.allclose(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6)


def test_invalid_step_count_is_rejected():
    ours = NoiseScheduler(SchedulerConfig())
    with pytest.raises(ValueError, match='num_inference_steps'):
        ours.set_timesteps(0)
    with pytest.raises(ValueError, match='sampler'):
        ours.set_timesteps(10, 'euler')
