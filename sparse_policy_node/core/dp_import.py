"""Map a Diffusion Policy (real-stanford/diffusion_policy) DP-T state dict onto our layout.

Upstream ``DiffusionTransformerHybridImagePolicy`` state dicts (the ``ema_model`` entry of a
workspace checkpoint) hold:

- ``model.*``: ``TransformerForDiffusion`` (``decoder.layers.{i}`` is an
  ``nn.TransformerDecoderLayer``; ``encoder.{0,2}`` the condition MLP; buffers ``mask`` and
  ``memory_mask``);
- ``obs_encoder.obs_nets.{key}.nets.{0: trunk, 1: spatial softmax, 3: linear}`` (robomimic
  ``VisualCore`` with a ResNet-18 trunk whose BatchNorms were replaced by GroupNorm);
- ``normalizer.params_dict.{key}.{scale, offset}`` (+ ``input_stats``).

The architecture is inferred from tensor shapes wherever it can be; the head count and the
order of the low-dim keys cannot be, and are arguments.
"""

import re
from typing import Dict
from typing import Optional
from typing import Sequence

from sparse_policy_node.core.config import ObsConfig
from sparse_policy_node.core.config import PolicyConfig
from sparse_policy_node.core.config import SchedulerConfig
from sparse_policy_node.core.config import TransformerConfig
from sparse_policy_node.core.config import VisionConfig
import torch

DEFAULT_LOWDIM_ORDER = ('robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos')
SKIPPED_BUFFERS = ('mask', 'memory_mask', '_dummy_variable')


class DPImportError(ValueError):
    """The upstream state dict does not have the expected DP-T layout."""


def _normalizer_params(state: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    params = {}
    for key, value in state.items():
        m = re.fullmatch(r'normalizer\.params_dict\.(.+)\.(scale|offset)', key)
        if m:
            params.setdefault(m.group(1), {})[m.group(2)] = value
    return params


def infer_config(state: Dict[str, torch.Tensor], n_head: int = 4,
                 lowdim_order: Sequence[str] = DEFAULT_LOWDIM_ORDER,
                 crop_size: Optional[Sequence[int]] = None,
                 image_size: Sequence[int] = (84, 84)) -> PolicyConfig:
    """Infer a :class:`PolicyConfig` from an upstream DP-T image-policy state dict."""
    def need(key):
        if key not in state:
            raise DPImportError(f'state dict has no {key!r}: not a DP-T image policy '
                                f'(TransformerForDiffusion with obs_as_cond)')
        return state[key]

    pos = need('model.pos_emb')  # (1, T_a, D)
    cond_pos = need('model.cond_pos_emb')  # (1, 1 + T_o, D)
    head = need('model.head.weight')  # (A, D)
    layers = {int(m.group(1)) for k in state
              for m in [re.match(r'model\.decoder\.layers\.(\d+)\.', k)] if m}
    if not layers:
        raise DPImportError('state dict has no model.decoder.layers.*')
    if 'model.encoder.0.weight' not in state:
        raise DPImportError('only n_cond_layers=0 (MLP condition encoder) is supported')
    cameras = sorted({m.group(1) for k in state
                      for m in [re.match(r'obs_encoder\.obs_nets\.(.+)_image\.', k)] if m})
    norm = _normalizer_params(state)
    lowdim = []
    for key in lowdim_order:
        if key in norm:
            lowdim.append((key, int(norm[key]['scale'].numel())))
    extra = sorted(set(norm) - set(lowdim_order) - {'action'}
                   - {f'{c}_image' for c in cameras})
    if extra:
        raise DPImportError(f'low-dim keys {extra} are not in '
                            f'lowdim_order={list(lowdim_order)}; pass their order explicitly')
    if crop_size is None:
        crop_size = (76, 76) if tuple(image_size) == (84, 84) else tuple(image_size)
    trunk = 'resnet18'
    feature_dim = 64
    if cameras:
        lin = need(f'obs_encoder.obs_nets.{cameras[0]}_image.nets.3.weight')
        feature_dim = int(lin.shape[0])
        num_kp = int(lin.shape[1]) // 2
    else:
        num_kp = 32
    vision = VisionConfig(cameras=tuple(cameras), image_size=tuple(image_size),
                          crop_size=tuple(crop_size), trunk=trunk, num_keypoints=num_kp,
                          feature_dim=feature_dim)
    transformer = TransformerConfig(n_layer=max(layers) + 1, n_head=n_head,
                                    n_emb=int(pos.shape[2]), horizon=int(pos.shape[1]),
                                    n_obs_steps=int(cond_pos.shape[1]) - 1,
                                    action_dim=int(head.shape[0]))
    n_action_steps = min(8, transformer.horizon - transformer.n_obs_steps + 1)
    return PolicyConfig(obs=ObsConfig(vision=vision, lowdim=tuple(lowdim)),
                        transformer=transformer, scheduler=SchedulerConfig(),
                        n_action_steps=n_action_steps)


def convert_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename upstream tensors to this package's :class:`DiffusionPolicy` names."""
    out = {}
    norm = _normalizer_params(state)
    for key, value in state.items():
        if key.startswith('model.'):
            name = key[len('model.'):]
            if name in SKIPPED_BUFFERS:
                continue
            name = name.replace('decoder.layers.', 'layers.')
            out['transformer.' + name] = value
            continue
        m = re.fullmatch(r'obs_encoder\.obs_nets\.(.+)_image\.nets\.(\d)\.(.+)', key)
        if m:
            cam, part, rest = m.groups()
            prefix = f'obs_encoder.obs_nets.{cam}.'
            if part == '0' and rest.startswith('nets.'):
                out[prefix + 'trunk.' + rest[len('nets.'):]] = value
            elif part == '1' and rest in ('nets.weight', 'nets.bias'):
                out[prefix + 'pool.' + rest] = value
            elif part == '3':
                out[prefix + 'linear.' + rest] = value
            # pos_x / pos_y of the spatial softmax are recomputed, not loaded.
    for key, params in norm.items():
        if key.endswith('_image'):
            continue  # images are mapped to [-1, 1] by the encoder, as DP's range normalizer
        out[f'normalizer.{key}__scale'] = params['scale'].reshape(-1)
        out[f'normalizer.{key}__offset'] = params['offset'].reshape(-1)
    return out


def check_image_normalizer(state: Dict[str, torch.Tensor]) -> None:
    """Raise unless every image normalizer is DP's [0, 1] -> [-1, 1] range map."""
    for key, params in _normalizer_params(state).items():
        if key.endswith('_image'):
            scale, offset = params['scale'], params['offset']
            if not (torch.allclose(scale, torch.full_like(scale, 2.0))
                    and torch.allclose(offset, torch.full_like(offset, -1.0))):
                raise DPImportError(f'image normalizer of {key!r} is not the [0, 1] -> '
                                    f'[-1, 1] range map this package assumes')
