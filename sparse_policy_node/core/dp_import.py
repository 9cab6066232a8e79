"""Map a Diffusion Policy (real-stanford/diffusion_policy) DP-T state dict onto our layout.

Upstream ``DiffusionTransformerHybridImagePolicy`` state dicts (the ``ema_model`` entry of a
workspace checkpoint) hold:

- ``model.*``: ``TransformerForDiffusion`` (``decoder.layers.{i}`` is an
  ``nn.TransformerDecoderLayer``; ``encoder.{0,2}`` the condition MLP; buffers ``mask`` and
  ``memory_mask``);
- ``obs_encoder.obs_nets.{key}.nets.{0: trunk, 1: spatial softmax, 3: linear}`` (robomimic
  ``VisualCore`` with a ResNet-18 trunk whose BatchNorms were replaced by GroupNorm);
- ``normalizer.params_dict.{key}.{scale, offset}`` (+ ``input_stats``).

With the policy's config (:mod:`~sparse_policy_node.core.dp_config`) the importer takes the
observation order, sizes, crop and sampler from it and checks them against the tensors;
without it the architecture is inferred from tensor shapes and the rest guessed. Image keys
may have any name (``agentview_image``, ``camera_0``); robomimic's ReLU on each camera's
features is kept (``VisionConfig.feature_activation='relu'``).
"""

import re
from typing import Dict
from typing import List
from typing import Optional
from typing import Sequence

from sparse_policy_node.core import keys
from sparse_policy_node.core.config import ObsConfig
from sparse_policy_node.core.config import PolicyConfig
from sparse_policy_node.core.config import SchedulerConfig
from sparse_policy_node.core.config import TransformerConfig
from sparse_policy_node.core.config import VisionConfig
from sparse_policy_node.core.dp_config import check_policy_target
from sparse_policy_node.core.dp_config import DPConfigError
from sparse_policy_node.core.dp_config import DPSpec
import torch

DEFAULT_LOWDIM_ORDER = ('robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos')
SKIPPED_BUFFERS = ('mask', 'memory_mask', '_dummy_variable')
UNET_PREFIXES = ('model.diffusion_step_encoder.', 'model.down_modules.', 'model.mid_modules.')


class DPImportError(DPConfigError):
    """The upstream state dict does not have the expected DP-T layout."""


def _normalizer_params(state: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    params = {}
    for key, value in state.items():
        m = re.fullmatch(r'normalizer\.params_dict\.(.+)\.(scale|offset)', key)
        if m:
            params.setdefault(m.group(1), {})[m.group(2)] = value
    return params


def camera_name(dp_key: str) -> str:
    """Return our camera name for a DP image key.

    ``agentview_image`` -> ``agentview``, ``camera_0`` -> ``camera_0``; this package's
    observation key of camera ``c`` is ``f'{c}_image'``.
    """
    return dp_key[:-len(keys.IMAGE_SUFFIX)] if dp_key.endswith(keys.IMAGE_SUFFIX) else dp_key


def _encoder_keys(state: Dict[str, torch.Tensor]) -> List[str]:
    """DP observation keys that have an observation net (the cameras), sorted."""
    return sorted({m.group(1) for k in state
                   for m in [re.match(r'obs_encoder\.obs_nets\.([^.]+)\.nets\.', k)] if m})


def _check_transformer(state: Dict[str, torch.Tensor]) -> None:
    if any(k.startswith(UNET_PREFIXES) for k in state):
        check_policy_target('DiffusionUnetHybridImagePolicy')  # raises, saying why
    if 'model.pos_emb' not in state:
        raise DPImportError('state dict has no "model.pos_emb": not a DP-T image policy '
                            '(TransformerForDiffusion with obs_as_cond)')
    if 'model.encoder.0.weight' not in state:
        raise DPImportError('only n_cond_layers=0 (MLP condition encoder) is supported')


def _layers(state: Dict[str, torch.Tensor]) -> int:
    layers = {int(m.group(1)) for k in state
              for m in [re.match(r'model\.decoder\.layers\.(\d+)\.', k)] if m}
    if not layers:
        raise DPImportError('state dict has no model.decoder.layers.*')
    return max(layers) + 1


def _vision(state, image_keys, image_size, crop_size) -> VisionConfig:
    feature_dim, num_kp = 64, 32
    if image_keys:
        lin = state[f'obs_encoder.obs_nets.{image_keys[0]}.nets.3.weight']  # (F, 2 kp)
        feature_dim, num_kp = int(lin.shape[0]), int(lin.shape[1]) // 2
    cameras = tuple(camera_name(k) for k in image_keys)
    if len(set(cameras)) != len(cameras):
        raise DPImportError(f'image keys {list(image_keys)} map to the same camera names '
                            f'{list(cameras)}')
    return VisionConfig(cameras=cameras, image_size=tuple(image_size),
                        crop_size=tuple(crop_size), trunk='resnet18', num_keypoints=num_kp,
                        feature_dim=feature_dim, feature_activation='relu')


def infer_config(state: Dict[str, torch.Tensor], spec: Optional[DPSpec] = None,
                 n_head: int = 4, lowdim_order: Sequence[str] = DEFAULT_LOWDIM_ORDER,
                 crop_size: Optional[Sequence[int]] = None,
                 image_size: Sequence[int] = (84, 84)) -> PolicyConfig:
    """Build the :class:`PolicyConfig` of an upstream DP-T image-policy state dict.

    With ``spec`` (the policy's own config, see :mod:`~sparse_policy_node.core.dp_config`)
    everything comes from the config and is checked against the tensor shapes; the other
    arguments are ignored. Without it, the architecture is inferred from shapes and the rest
    guessed: cameras sorted by name, then ``lowdim_order`` (robomimic's real order is the
    task's ``shape_meta`` order), DDPM-100, ``n_action_steps`` at most 8.

    Image features always get robomimic's ReLU (``feature_activation='relu'``).
    """
    _check_transformer(state)
    if spec is not None:
        return _config_from_spec(state, spec)
    pos = state['model.pos_emb']  # (1, T_a, D)
    cond_pos = _need(state, 'model.cond_pos_emb')  # (1, 1 + T_o, D)
    head = _need(state, 'model.head.weight')  # (A, D)
    image_keys = _encoder_keys(state)
    norm = _normalizer_params(state)
    lowdim = [(key, int(norm[key]['scale'].numel())) for key in lowdim_order if key in norm]
    extra = sorted(set(norm) - set(lowdim_order) - {keys.ACTION} - set(image_keys))
    if extra:
        raise DPImportError(f'low-dim keys {extra} are not in '
                            f'lowdim_order={list(lowdim_order)}; pass their order explicitly '
                            f'or, better, the policy config (--config)')
    if crop_size is None:
        crop_size = (76, 76) if tuple(image_size) == (84, 84) else tuple(image_size)
    transformer = TransformerConfig(n_layer=_layers(state), n_head=n_head,
                                    n_emb=int(pos.shape[2]), horizon=int(pos.shape[1]),
                                    n_obs_steps=int(cond_pos.shape[1]) - 1,
                                    action_dim=int(head.shape[0]))
    n_action_steps = min(8, transformer.horizon - transformer.n_obs_steps + 1)
    return PolicyConfig(obs=ObsConfig(vision=_vision(state, image_keys, image_size, crop_size),
                                      lowdim=tuple(lowdim)),
                        transformer=transformer, scheduler=SchedulerConfig(),
                        n_action_steps=n_action_steps)


def _need(state, key):
    if key not in state:
        raise DPImportError(f'state dict has no {key!r}')
    return state[key]


def _config_from_spec(state: Dict[str, torch.Tensor], spec: DPSpec) -> PolicyConfig:
    """Build the PolicyConfig from the DP config, each size checked against the tensors."""
    found = {
        'n_emb': int(state['model.pos_emb'].shape[2]),
        'horizon': int(state['model.pos_emb'].shape[1]),
        'n_obs_steps': int(_need(state, 'model.cond_pos_emb').shape[1]) - 1,
        'action_dim': int(_need(state, 'model.head.weight').shape[0]),
        'n_layer': _layers(state),
    }
    for name, value in found.items():
        if getattr(spec, name) != value:
            raise DPImportError(f'config says {name}={getattr(spec, name)} but the weights '
                                f'have {value}: config and checkpoint do not belong together')
    encoders = set(_encoder_keys(state))
    if encoders != set(spec.image_keys):
        raise DPImportError(f'config image keys {sorted(spec.image_keys)} differ from the '
                            f'observation nets in the weights {sorted(encoders)}')
    norm = _normalizer_params(state)
    lowdim = []
    for key, kind, shape in spec.obs:
        if kind == 'low_dim':
            dim = int(torch.Size(shape).numel())
            if key not in norm or norm[key]['scale'].numel() != dim:
                raise DPImportError(f'low-dim key {key!r} ({dim}) has no matching normalizer '
                                    f'in the weights')
            lowdim.append((key, dim))
    sizes = {shape[1:] for _, kind, shape in spec.obs if kind == 'rgb'}
    if len(sizes) > 1:
        raise DPImportError(f'cameras of different image sizes {sorted(sizes)} are not '
                            f'supported (one image_size for all cameras)')
    image_size = sizes.pop() if sizes else (84, 84)
    crop = spec.crop or image_size
    vision = _vision(state, list(spec.image_keys), image_size, crop)
    order = tuple(keys.image_key(camera_name(k)) if kind == 'rgb' else k
                  for k, kind, _ in spec.obs)
    transformer = TransformerConfig(n_layer=spec.n_layer, n_head=spec.n_head, n_emb=spec.n_emb,
                                    horizon=spec.horizon, n_obs_steps=spec.n_obs_steps,
                                    action_dim=spec.action_dim, p_drop_attn=spec.p_drop_attn,
                                    p_drop_emb=spec.p_drop_emb)
    return PolicyConfig(obs=ObsConfig(vision=vision, lowdim=tuple(lowdim), order=order),
                        transformer=transformer, scheduler=spec.scheduler,
                        n_action_steps=spec.n_action_steps)


def convert_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename upstream tensors to this package's :class:`DiffusionPolicy` names."""
    out = {}
    image_keys = set(_encoder_keys(state))
    norm = _normalizer_params(state)
    for key, value in state.items():
        if key.startswith('model.'):
            name = key[len('model.'):]
            if name in SKIPPED_BUFFERS:
                continue
            name = name.replace('decoder.layers.', 'layers.')
            out['transformer.' + name] = value
            continue
        m = re.fullmatch(r'obs_encoder\.obs_nets\.([^.]+)\.nets\.(\d)\.(.+)', key)
        if m:
            dp_key, part, rest = m.groups()
            prefix = f'obs_encoder.obs_nets.{camera_name(dp_key)}.'
            if part == '0' and rest.startswith('nets.'):
                out[prefix + 'trunk.' + rest[len('nets.'):]] = value
            elif part == '1' and rest in ('nets.weight', 'nets.bias'):
                out[prefix + 'pool.' + rest] = value
            elif part == '1' and rest == 'temperature':
                if not torch.allclose(value, torch.ones_like(value)):
                    raise DPImportError(f'{key} = {value.tolist()}: only a spatial-softmax '
                                        f'temperature of 1 is supported')
            elif part == '3':
                out[prefix + 'linear.' + rest] = value
            # pos_x / pos_y of the spatial softmax are recomputed, not loaded.
    for key, params in norm.items():
        if key in image_keys:
            continue  # images are mapped to [-1, 1] by the encoder, as DP's range normalizer
        out[f'normalizer.{key}__scale'] = params['scale'].reshape(-1)
        out[f'normalizer.{key}__offset'] = params['offset'].reshape(-1)
    return out


def check_image_normalizer(state: Dict[str, torch.Tensor]) -> None:
    """Raise unless every image normalizer is DP's [0, 1] -> [-1, 1] range map."""
    image_keys = set(_encoder_keys(state))
    for key, params in _normalizer_params(state).items():
        if key in image_keys:
            scale, offset = params['scale'], params['offset']
            if not (torch.allclose(scale, torch.full_like(scale, 2.0))
                    and torch.allclose(offset, torch.full_like(offset, -1.0))):
                raise DPImportError(f'image normalizer of {key!r} is not the [0, 1] -> '
                                    f'[-1, 1] range map this package assumes')
