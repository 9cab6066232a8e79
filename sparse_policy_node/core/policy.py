"""Visuomotor diffusion policy: normalizer -> observation encoder -> DP-T -> scheduler.

This module composes; the maths lives in the concept modules. Timing contract (Diffusion
Policy's, T_o = 2, T_a = 10, n_action_steps = 8)::

    observation steps   |o0|o1|
    predicted horizon   |a0|a1|a2|a3|a4|a5|a6|a7|a8|a9|
    executed actions       |a1|a2|a3|a4|a5|a6|a7|a8|

The chunk ``action`` is ``action_pred[:, T_o - 1 : T_o - 1 + n_action_steps]``: its first
action is the one for the time of the newest observation.
"""

from typing import Dict
from typing import Optional

from sparse_policy_node.core import keys
from sparse_policy_node.core.config import PolicyConfig
from sparse_policy_node.core.normalizer import Normalizer
from sparse_policy_node.core.sampler import initial_noise
from sparse_policy_node.core.sampler import sample_dense
from sparse_policy_node.core.scheduler import NoiseScheduler
from sparse_policy_node.core.transformer import DPTransformer
from sparse_policy_node.core.vision import ObsEncoder
import torch
from torch import nn
import torch.nn.functional as F


class ObservationError(ValueError):
    """An observation batch is missing keys, has wrong shapes or non-finite values."""


class DiffusionPolicy(nn.Module):
    """DP-T diffusion policy with its normalizer and scheduler."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        obs = config.obs
        self.obs_encoder = ObsEncoder(obs.vision, obs.lowdim, obs.order)
        self.transformer = DPTransformer(config.transformer, obs.obs_feature_dim)
        dims = {keys.ACTION: config.transformer.action_dim}
        dims.update(dict(obs.lowdim))
        self.normalizer = Normalizer(dims)
        self.scheduler = NoiseScheduler(config.scheduler)

    # ==== observations ====

    def expected_obs_shapes(self) -> Dict[str, tuple]:
        """Per-key shape of one observation window without the batch axis."""
        T_o = self.config.transformer.n_obs_steps
        vision = self.config.obs.vision
        shapes = {keys.image_key(cam): (T_o, 3, *vision.image_size) for cam in vision.cameras}
        shapes.update({key: (T_o, dim) for key, dim in self.config.obs.lowdim})
        return shapes

    def check_obs(self, obs: Dict[str, torch.Tensor]) -> int:
        """Validate an observation batch and return its batch size B.

        Raises:
            ObservationError: naming the missing key, the wrong shape or the non-finite values.
        """
        batch = None
        for key, shape in self.expected_obs_shapes().items():
            if key not in obs:
                raise ObservationError(f'observation is missing key {key!r}; '
                                       f'expected keys {sorted(self.expected_obs_shapes())}')
            value = obs[key]
            if not isinstance(value, torch.Tensor):
                raise ObservationError(f'observation {key!r} must be a tensor, '
                                       f'got {type(value).__name__}')
            if tuple(value.shape[1:]) != shape:
                raise ObservationError(f'observation {key!r} has shape {tuple(value.shape)}, '
                                       f'expected (B, {", ".join(map(str, shape))})')
            if batch is not None and value.shape[0] != batch:
                raise ObservationError(f'observation {key!r} has batch {value.shape[0]}, '
                                       f'other keys have {batch}')
            batch = value.shape[0]
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ObservationError(f'observation {key!r} contains NaN or inf')
        return batch

    def encode_obs(self, obs: Dict[str, torch.Tensor],
                   camera_features: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """Normalize low-dim keys and encode a (B, T_o, ...) window to (B, T_o, D_o).

        Args:
            obs: observation window, each key (B, T_o, ...).
            camera_features: optional (B, T_o, F) features per image key, computed ahead of
                time (see :class:`~sparse_policy_node.core.frame_cache.FrameFeatureCache`);
                those cameras are not encoded again.
        """
        normed = dict(obs)
        for key, _ in self.config.obs.lowdim:
            normed[key] = self.normalizer.normalize(key, obs[key].float())
        return self.obs_encoder(normed, camera_features)

    # ==== training ====

    def compute_loss(self, obs: Dict[str, torch.Tensor], action: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Epsilon-prediction DDPM loss.

        Args:
            obs: observation window, each key (B, T_o, ...).
            action: (B, T_a, A) raw (unnormalized) action chunk.
            generator: optional random generator for noise and timesteps.

        Returns:
            scalar MSE between predicted and true noise.
        """
        B = action.shape[0]
        cond = self.encode_obs(obs)
        x0 = self.normalizer.normalize(keys.ACTION, action)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        t = torch.randint(0, self.config.scheduler.num_train_timesteps, (B,),
                          generator=generator, device=x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        return F.mse_loss(self.transformer(noisy, t, cond), noise)

    # ==== inference ====

    def chunk_from_prediction(self, action_pred: torch.Tensor) -> torch.Tensor:
        """(B, T_a, A) predicted horizon -> (B, n_action_steps, A) chunk to execute."""
        start = self.config.transformer.n_obs_steps - 1
        return action_pred[:, start:start + self.config.n_action_steps]

    def action_shape(self, batch: int) -> tuple:
        """(B, T_a, A) shape of the predicted horizon."""
        t = self.config.transformer
        return (batch, t.horizon, t.action_dim)

    @torch.no_grad()
    def predict_action(self, obs: Dict[str, torch.Tensor], noise: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None,
                       step_noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Dense sampling of one action chunk.

        Args:
            obs: observation window, each key (B, T_o, ...); see :meth:`expected_obs_shapes`.
            noise: optional (B, T_a, A) initial noise (drawn from ``generator`` otherwise).
            generator: random generator for the initial and per-step noise.
            step_noise: optional (K, B, T_a, A) DDPM variance noise.

        Returns:
            ``action_pred`` (B, T_a, A) and ``action`` (B, n_action_steps, A), unnormalized.
        """
        B = self.check_obs(obs)
        cond = self.encode_obs(obs)
        if noise is None:
            noise = initial_noise(self.action_shape(B), generator, cond.device, cond.dtype)
        nactions = sample_dense(self.transformer, self.scheduler, cond, noise, step_noise,
                                generator)
        action_pred = self.normalizer.unnormalize(keys.ACTION, nactions)
        return {'action_pred': action_pred, 'action': self.chunk_from_prediction(action_pred)}
