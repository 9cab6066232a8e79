"""Read a Diffusion Policy (real-stanford/diffusion_policy) Hydra config as plain data.

A DP workspace checkpoint pickles its Hydra config; this package never unpickles by default,
so the config comes as a sidecar the user exports once (JSON or YAML, see the README), or as
the run's own ``.hydra/config.yaml``. This module turns that plain data into what the importer
needs: the observation keys in ``shape_meta`` order (the order robomimic concatenates their
features in), image size and crop, horizon, T_o, n_action_steps, the transformer's sizes and
the inference sampler with its K.

Hydra interpolations (``${horizon}``, ``${task.shape_meta}``, and DP's
``${eval:'${n_action_steps}+${n_latency_steps}'}``) are resolved here; ``eval`` accepts
integer arithmetic only (no code is executed).
"""

import ast
from dataclasses import dataclass
import operator
import re
from typing import Any
from typing import Optional
from typing import Tuple

from sparse_policy_node.core.config import SchedulerConfig


class DPConfigError(ValueError):
    """The Diffusion Policy config is not one this package can import; says why."""


TRANSFORMER_IMAGE_POLICY = 'DiffusionTransformerHybridImagePolicy'
_INTERPOLATION = re.compile(r'\$\{([^${}]*)\}')
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Div: operator.truediv}


@dataclass
class DPSpec:
    """What an imported DP-T image policy's config fixes.

    Args:
        obs: ``((dp_key, type, shape), ...)`` in ``shape_meta`` order; type is ``'rgb'`` or
            ``'low_dim'``; shape is (3, H, W) for images, (d, ...) for low-dim keys.
        action_dim: A.
        horizon: T_a.
        n_obs_steps: T_o.
        n_action_steps: actions executed per chunk (DP passes
            ``n_action_steps + n_latency_steps`` to the policy; this is that value).
        crop: (h, w) centre crop at inference, or None for no crop.
        n_layer: decoder layers.
        n_head: attention heads.
        n_emb: width D.
        p_drop_attn: dropout in the decoder layers (training only).
        p_drop_emb: embedding dropout (training only).
        scheduler: the training schedule and the configured inference sampler and K.
    """

    obs: Tuple[Tuple[str, str, Tuple[int, ...]], ...]
    action_dim: int
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    crop: Optional[Tuple[int, int]]
    n_layer: int
    n_head: int
    n_emb: int
    p_drop_attn: float
    p_drop_emb: float
    scheduler: SchedulerConfig

    @property
    def image_keys(self) -> Tuple[str, ...]:
        """DP observation keys of type rgb, in ``shape_meta`` order."""
        return tuple(k for k, t, _ in self.obs if t == 'rgb')


# ==== interpolation ====

def _lookup(root: dict, path: str) -> Any:
    node = root
    for part in path.split('.'):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise DPConfigError(f'interpolation ${{{path}}} does not resolve ({part!r} missing)')
    return node


def _safe_eval(expr: str) -> Any:
    """Evaluate integer/float arithmetic (``8+0``, ``2-1+0``); anything else is an error."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise DPConfigError(f'${{eval:...}} only takes arithmetic, got {expr!r}')
    try:
        tree = ast.parse(expr.strip(), mode='eval')
    except SyntaxError as exc:
        raise DPConfigError(f'${{eval:...}} cannot parse {expr!r}') from exc
    return value(tree.body)


def _resolve_string(text: str, root: dict, depth: int) -> Any:
    if depth > 20:
        raise DPConfigError(f'interpolation {text!r} nests too deeply (a cycle?)')
    while True:
        m = _INTERPOLATION.search(text)
        if m is None:
            return text
        inner = m.group(1).strip()
        if inner.startswith('eval:'):
            result = _safe_eval(inner[len('eval:'):].strip().strip('\'"'))
        elif inner.startswith('.') or ':' in inner:
            raise DPConfigError(f'interpolation ${{{inner}}} is not supported; export the '
                                f'config resolved (OmegaConf.to_container(cfg, resolve=True))')
        else:
            result = resolve(_lookup(root, inner), root, depth + 1)
        if m.group(0) == text:
            return result  # the whole value: keep its type (list, dict, int)
        text = text[:m.start()] + str(result) + text[m.end():]


def resolve(node: Any, root: Optional[dict] = None, depth: int = 0) -> Any:
    """Return ``node`` with every Hydra interpolation replaced by its value.

    Args:
        node: plain data (dicts, lists, scalars) as loaded from JSON or YAML.
        root: the document interpolation paths refer to (``node`` itself by default).
    """
    root = node if root is None else root
    if isinstance(node, dict):
        return {k: resolve(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, root, depth) for v in node]
    if isinstance(node, str) and '${' in node:
        return _resolve_string(node, root, depth)
    return node


# ==== policy config ====

def _get(section: dict, key: str, where: str, default: Any = ...) -> Any:
    if key not in section:
        if default is ...:
            raise DPConfigError(f'{where} has no {key!r}')
        return default
    return section[key]


def _scheduler(noise: dict, num_inference_steps: int) -> SchedulerConfig:
    where = 'policy.noise_scheduler'
    target = str(_get(noise, '_target_', where))
    name = target.rsplit('.', 1)[-1]
    if name not in ('DDPMScheduler', 'DDIMScheduler'):
        raise DPConfigError(f'{where}._target_ {target!r} is not supported (DDPMScheduler or '
                            f'DDIMScheduler)')
    prediction = noise.get('prediction_type', 'epsilon')
    if prediction != 'epsilon':
        raise DPConfigError(f'{where}.prediction_type {prediction!r} is not supported '
                            f'(epsilon only)')
    if name == 'DDPMScheduler' and noise.get('variance_type', 'fixed_small') != 'fixed_small':
        raise DPConfigError(f'{where}.variance_type {noise["variance_type"]!r} is not '
                            f'supported (fixed_small only)')
    if name == 'DDIMScheduler' and (not noise.get('set_alpha_to_one', True)
                                    or noise.get('steps_offset', 0) != 0):
        raise DPConfigError(f'{where}: DDIM needs set_alpha_to_one=True and steps_offset=0')
    kwargs = {'sampler': 'ddpm' if name == 'DDPMScheduler' else 'ddim',
              'num_inference_steps': int(num_inference_steps)}
    for key in ('num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule',
                'clip_sample'):
        if key in noise:
            kwargs[key] = noise[key]
    if 'num_train_timesteps' in kwargs:
        kwargs['num_train_timesteps'] = int(kwargs['num_train_timesteps'])
    for key in ('beta_start', 'beta_end'):
        if key in kwargs:
            kwargs[key] = float(kwargs[key])
    return SchedulerConfig(**kwargs)


def check_policy_target(target: str) -> None:
    """Raise unless ``target`` names DP's transformer image policy (says why otherwise)."""
    name = str(target).rsplit('.', 1)[-1]
    if 'Unet' in name or 'UNet' in name:
        raise DPConfigError(
            f'{name} is a U-Net (ConditionalUnet1D) policy; only the transformer '
            f'{TRANSFORMER_IMAGE_POLICY} can be imported: test-time sparsity prunes the '
            f'3 L residual units (self-attention, cross-attention, feed-forward) of the DP-T '
            f'decoder and reuses their outputs, and a U-Net has no such units')
    if name != TRANSFORMER_IMAGE_POLICY:
        raise DPConfigError(f'policy {name!r} is not supported; only '
                            f'{TRANSFORMER_IMAGE_POLICY} (DP-T with an image/low-dim '
                            f'observation encoder) can be imported')


def spec_from_config(cfg: dict) -> DPSpec:
    """Read a DP workspace config (or its ``policy`` section) into a :class:`DPSpec`.

    Args:
        cfg: plain data of the whole workspace config (with ``policy``) or of the policy
            section alone; interpolations are resolved against the whole document.

    Raises:
        DPConfigError: naming the missing or unsupported field.
    """
    if not isinstance(cfg, dict):
        raise DPConfigError(f'the config must be a mapping, got {type(cfg).__name__}')
    cfg = resolve(cfg)
    policy = cfg.get('policy', cfg)
    if not isinstance(policy, dict):
        raise DPConfigError('config.policy must be a mapping')
    check_policy_target(_get(policy, '_target_', 'policy'))
    for key, want in (('n_cond_layers', 0), ('time_as_cond', True), ('obs_as_cond', True),
                      ('causal_attn', True), ('obs_encoder_group_norm', True)):
        if key in policy and policy[key] != want:
            raise DPConfigError(f'policy.{key}={policy[key]!r} is not supported (needs {want!r})')
    meta = _get(policy, 'shape_meta', 'policy')
    obs_meta = _get(meta, 'obs', 'policy.shape_meta')
    if not isinstance(obs_meta, dict) or not obs_meta:
        raise DPConfigError('policy.shape_meta.obs must be a non-empty mapping')
    obs = []
    for key, attr in obs_meta.items():  # YAML/JSON mappings keep the file's order
        kind = attr.get('type', 'low_dim')
        if kind not in ('rgb', 'low_dim'):
            raise DPConfigError(f'shape_meta.obs.{key}.type {kind!r} is not supported '
                                f'(rgb or low_dim)')
        shape = tuple(int(v) for v in _get(attr, 'shape', f'shape_meta.obs.{key}'))
        if kind == 'rgb' and (len(shape) != 3 or shape[0] != 3):
            raise DPConfigError(f'shape_meta.obs.{key}.shape must be [3, H, W], got {shape}')
        obs.append((str(key), kind, shape))
    action_shape = _get(_get(meta, 'action', 'policy.shape_meta'), 'shape',
                        'policy.shape_meta.action')
    if len(action_shape) != 1:
        raise DPConfigError(f'shape_meta.action.shape must be [A], got {action_shape}')
    crop = policy.get('crop_shape')
    return DPSpec(
        obs=tuple(obs), action_dim=int(action_shape[0]),
        horizon=int(_get(policy, 'horizon', 'policy')),
        n_obs_steps=int(_get(policy, 'n_obs_steps', 'policy')),
        n_action_steps=int(_get(policy, 'n_action_steps', 'policy')),
        crop=None if crop is None else (int(crop[0]), int(crop[1])),
        n_layer=int(_get(policy, 'n_layer', 'policy')),
        n_head=int(_get(policy, 'n_head', 'policy')),
        n_emb=int(_get(policy, 'n_emb', 'policy')),
        p_drop_attn=float(policy.get('p_drop_attn', 0.3)),
        p_drop_emb=float(policy.get('p_drop_emb', 0.0)),
        scheduler=_scheduler(_get(policy, 'noise_scheduler', 'policy'),
                             _get(policy, 'num_inference_steps', 'policy')))
