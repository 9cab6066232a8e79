"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ optional pruner files).

Nothing on these load paths unpickles: users load model directories from elsewhere, and
safetensors + JSON cannot execute code. Every failure raises :class:`CheckpointError` with the
path and what is wrong (missing file, bad JSON, unknown config field, missing/unexpected
tensor, shape mismatch).
"""

import hashlib
import json
import os
from typing import Dict
from typing import Optional
from typing import Tuple

from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save_file
from sparse_policy_node.core.config import config_from_dict
from sparse_policy_node.core.config import config_to_dict
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import PolicyConfig
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.model_card import default_card
from sparse_policy_node.core.model_card import write_card
import torch
from torch import nn

FORMAT_VERSION = 1
POLICY_CONFIG = 'config.json'
POLICY_WEIGHTS = 'model.safetensors'
PRUNER_CONFIG = 'pruner.json'
PRUNER_WEIGHTS = 'pruner.safetensors'
PRUNERS_DIR = 'pruners'  # extra pruners, one per schedule: pruners/<sampler>-<K>/
SERVING_CONFIG = 'serving.json'


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, corrupt or does not match the model."""


def _write_json(path: str, data: dict) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write('\n')
    os.replace(tmp, path)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f'{path} does not exist')
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f'{path} is not valid JSON: {exc}') from exc
    if not isinstance(data, dict):
        raise CheckpointError(f'{path} must hold a JSON object')
    version = data.get('format_version')
    if version != FORMAT_VERSION:
        raise CheckpointError(f'{path} has format_version {version!r}; this package reads '
                              f'version {FORMAT_VERSION}')
    return data


def _save_tensors(module: nn.Module, path: str) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path + '.tmp'
    save_file(state, tmp)
    os.chmod(tmp, 0o644)  # a model directory is meant to be shared and installed
    os.replace(tmp, path)


def load_state_strict(module: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped tensor is an error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f'{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f'missing tensors {missing[:8]}{" ..." if len(missing) > 8 else ""}')
    if unexpected:
        problems.append(f'unexpected tensors {unexpected[:8]}'
                        f'{" ..." if len(unexpected) > 8 else ""}')
    if mismatched:
        problems.append(f'shape mismatch {mismatched[:8]}')
    if problems:
        raise CheckpointError(f'{source} does not match the model: ' + '; '.join(problems))
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f'{source}: tensor {key!r} contains NaN or inf')
    module.load_state_dict(state, strict=True)


def _load_tensors(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f'{path} does not exist')
    try:
        return load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f'{path} is not a readable safetensors file: {exc}') from exc


def save_policy(policy, directory: str, metadata: Optional[dict] = None) -> None:
    """Write ``policy`` (config + weights + normalizer) to ``directory``."""
    os.makedirs(directory, exist_ok=True)
    _save_tensors(policy, os.path.join(directory, POLICY_WEIGHTS))
    _write_json(os.path.join(directory, POLICY_CONFIG), {
        'format_version': FORMAT_VERSION,
        'policy': config_to_dict(policy.config),
        'metadata': metadata or {},
    })
    # The model card (action space, frames, rate, preprocessing), when the metadata tells.
    card = default_card(policy.config, metadata)
    if card is not None:
        write_card(directory, card)


def load_policy_config(directory: str) -> PolicyConfig:
    """Read and validate the :class:`PolicyConfig` of a checkpoint directory."""
    if not os.path.isdir(directory):
        raise CheckpointError(f'model directory {directory!r} does not exist')
    path = os.path.join(directory, POLICY_CONFIG)
    data = _read_json(path)
    try:
        return config_from_dict(PolicyConfig, data.get('policy'), 'policy')
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f'{path}: {exc}') from exc


def load_policy(directory: str, device: str = 'cpu'):
    """Build a :class:`DiffusionPolicy` from ``directory`` in eval mode on ``device``."""
    from sparse_policy_node.core.policy import DiffusionPolicy
    config = load_policy_config(directory)
    policy = DiffusionPolicy(config)
    path = os.path.join(directory, POLICY_WEIGHTS)
    load_state_strict(policy, _load_tensors(path), path)
    return policy.to(device).eval()


def read_metadata(directory: str) -> dict:
    """Return the free-form ``metadata`` of a policy checkpoint (training provenance)."""
    return _read_json(os.path.join(directory, POLICY_CONFIG)).get('metadata', {})


def has_pruner(directory: str) -> bool:
    """Return True when ``directory`` also holds pruner files."""
    return os.path.isfile(os.path.join(directory, PRUNER_CONFIG))


def save_pruner(pruner, directory: str, metadata: Optional[dict] = None) -> None:
    """Write a pruner (config + weights) next to the policy files of ``directory``."""
    os.makedirs(directory, exist_ok=True)
    _save_tensors(pruner, os.path.join(directory, PRUNER_WEIGHTS))
    _write_json(os.path.join(directory, PRUNER_CONFIG), {
        'format_version': FORMAT_VERSION,
        'pruner': config_to_dict(pruner.config),
        'num_units': pruner.num_units,
        'cond_dim': pruner.cond_dim,
        'metadata': metadata or {},
    })


def read_pruner_metadata(directory: str) -> dict:
    """Return the free-form ``metadata`` of a pruner (training schedule, target, provenance)."""
    return _read_json(os.path.join(directory, PRUNER_CONFIG)).get('metadata', {})


def policy_sha256(directory: str) -> str:
    """Hex SHA-256 of a model directory's policy weights (what a pruner was trained for)."""
    digest = hashlib.sha256()
    with open(os.path.join(directory, POLICY_WEIGHTS), 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def schedule_name(sampler: str, steps: int) -> str:
    """``'<sampler>-<K>'``, e.g. ``'ddim-10'`` (pruner sub-directory names, variant names)."""
    return f'{sampler}-{int(steps)}'


def pruner_schedule_of(metadata: dict) -> Optional[Tuple[str, int]]:
    """(sampler, K) a pruner was trained for, from its metadata; None when not recorded."""
    if 'sampler' in metadata and 'num_inference_steps' in metadata:
        return str(metadata['sampler']), int(metadata['num_inference_steps'])
    return None


def for_schedule(by_schedule: dict, schedule: Tuple[str, int]):
    """Return the entry of ``{(sampler, K) or None: x}`` for ``schedule``, else the None one.

    Pruners (or their directories) are keyed by the schedule they were trained for; a pruner
    with no recorded schedule serves any schedule. Returns None when neither exists.
    """
    return by_schedule.get(tuple(schedule), by_schedule.get(None))


def trained_max_age(pruner) -> int:
    """Return the cache max age a pruner was trained with (0: none, or no pruner given)."""
    return int((getattr(pruner, 'metadata', None) or {}).get('train_config', {})
               .get('rollout_max_age', 0))


def pruner_dirs(model_dir: str) -> Dict[Optional[Tuple[str, int]], str]:
    """Every pruner of a model directory by the schedule it was trained for.

    The top-level ``pruner.json`` and each ``pruners/<sampler>-<K>/pruner.json``. A pruner
    without a recorded schedule is keyed ``None`` (usable on any schedule, unchecked).

    Raises:
        CheckpointError: two pruners claim the same schedule.
    """
    found: Dict[Optional[Tuple[str, int]], str] = {}
    candidates = [model_dir]
    extra = os.path.join(model_dir, PRUNERS_DIR)
    if os.path.isdir(extra):
        candidates += [os.path.join(extra, d) for d in sorted(os.listdir(extra))]
    for directory in candidates:
        if not has_pruner(directory):
            continue
        schedule = pruner_schedule_of(read_pruner_metadata(directory))
        if schedule in found:
            raise CheckpointError(f'{directory} and {found[schedule]} both hold a pruner for '
                                  f'schedule {schedule}; keep one')
        found[schedule] = directory
    return found


def load_pruners(model_dir: str, device: str = 'cpu') -> dict:
    """Load every pruner of ``model_dir``, each checked against its policy weights.

    See :func:`pruner_dirs` for where pruners live.

    Returns:
        {(sampler, K) or None: Pruner}.
    """
    return {schedule: load_pruner(directory, device, policy_dir=model_dir)
            for schedule, directory in pruner_dirs(model_dir).items()}


def read_serving_config(model_dir: str) -> Optional[dict]:
    """Read the serving default of ``sparse-policy frontier --install``, or None.

    Returns:
        ``{'runtime': {RuntimeConfig fields}, ...}`` as written.
    """
    path = os.path.join(model_dir, SERVING_CONFIG)
    if not os.path.isfile(path):
        return None
    data = _read_json(path)
    if not isinstance(data.get('runtime'), dict):
        raise CheckpointError(f'{path} must hold a "runtime" object')
    return data


def write_serving_config(model_dir: str, runtime: dict, provenance: dict) -> str:
    """Write the serving default (RuntimeConfig fields + how it was chosen); return the path."""
    path = os.path.join(model_dir, SERVING_CONFIG)
    _write_json(path, {'format_version': FORMAT_VERSION, 'runtime': runtime,
                       'chosen_by': provenance})
    return path


def load_pruner(directory: str, device: str = 'cpu', policy_dir: Optional[str] = None):
    """Build the pruner stored in ``directory`` (eval mode).

    The pruner gets ``schedule`` ((sampler, K) it was trained for, or None) and ``metadata``.
    With ``policy_dir``, the policy hash recorded at training is checked against that
    directory's weights: a pruner trained for other weights raises :class:`CheckpointError`.
    """
    from sparse_policy_node.core.pruner import Pruner
    path = os.path.join(directory, PRUNER_CONFIG)
    data = _read_json(path)
    try:
        config = config_from_dict(PrunerConfig, data.get('pruner'), 'pruner')
        num_units, cond_dim = int(data['num_units']), int(data['cond_dim'])
    except (ConfigError, TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f'{path}: {exc}') from exc
    metadata = data.get('metadata') or {}
    recorded = metadata.get('policy_sha256')
    if policy_dir is not None and recorded and recorded != policy_sha256(policy_dir):
        raise CheckpointError(
            f'{path} was trained for policy weights with sha256 {recorded[:12]}..., but '
            f'{os.path.join(policy_dir, POLICY_WEIGHTS)} has {policy_sha256(policy_dir)[:12]}'
            f'...; retrain the pruner for these weights (sparse-policy train-pruner)')
    pruner = Pruner(config, num_units=num_units, cond_dim=cond_dim)
    weights = os.path.join(directory, PRUNER_WEIGHTS)
    load_state_strict(pruner, _load_tensors(weights), weights)
    pruner.schedule = pruner_schedule_of(metadata)
    pruner.metadata = metadata
    return pruner.to(device).eval()
