"""Typed training configuration loaded from the YAML files under ``config/train/``.

The policy architecture is a preset name plus nested overrides, e.g.::

    preset: small
    overrides:
      transformer: {n_layer: 4}
      scheduler: {num_inference_steps: 100}

Unknown keys and ill-typed values raise :class:`ConfigError` naming the field.
"""

import copy
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Dict
from typing import Optional
from typing import Tuple

from sparse_policy_node.core.config import config_from_dict
from sparse_policy_node.core.config import config_to_dict
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import make_preset
from sparse_policy_node.core.config import PolicyConfig
import yaml

DEVICES = ('auto', 'cpu', 'cuda')


@dataclass
class TrainConfig:
    """One training run.

    Args:
        dataset: robomimic-layout HDF5 file of demonstrations.
        out_dir: run directory (logs, resume state, EMA model snapshots).
        preset: policy preset name (``small``, ``tiny``, ``paper``).
        overrides: nested dict merged into the preset's fields.
        seed: seed of initialisation, shuffling and noise (rank r uses ``seed + r``).
        batch_size: per-process batch size.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay, applied to matrices and kernels only.
        betas: AdamW betas.
        warmup_steps: linear warm-up length before the cosine decay.
        max_steps: optimiser steps; the cosine schedule reaches 0 here.
        max_minutes: stop early (with a final checkpoint) after this wall time; 0 disables.
        ema_power: EMA warm-up power (Diffusion Policy's ``EMAModel``).
        ema_max_decay: upper bound of the EMA decay.
        grad_clip: gradient-norm clip; 0 disables.
        checkpoint_every: steps between checkpoints (resume state + EMA model snapshot).
        log_every: steps between log lines.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        threads: torch CPU threads per process; 0 leaves torch's default.
        max_demos: use only the first demos of the file; None uses all.
        num_workers: DataLoader worker processes.
    """

    dataset: str
    out_dir: str
    preset: str = 'small'
    overrides: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 500
    max_steps: int = 10000
    max_minutes: float = 0.0
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    grad_clip: float = 0.0
    checkpoint_every: int = 1000
    log_every: int = 50
    device: str = 'auto'
    threads: int = 0
    max_demos: Optional[int] = None
    num_workers: int = 0

    def __post_init__(self):
        for name in ('batch_size', 'max_steps', 'checkpoint_every', 'log_every'):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f'TrainConfig.{name} must be a positive int, got {value!r}')
        for name in ('warmup_steps', 'threads', 'num_workers', 'seed'):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f'TrainConfig.{name} must be an int >= 0, got {value!r}')
        if not self.lr > 0:
            raise ConfigError(f'TrainConfig.lr must be > 0, got {self.lr!r}')
        if self.weight_decay < 0 or self.grad_clip < 0 or self.max_minutes < 0:
            raise ConfigError('TrainConfig.weight_decay, grad_clip and max_minutes must be '
                              f'>= 0, got {self.weight_decay!r}, {self.grad_clip!r}, '
                              f'{self.max_minutes!r}')
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f'TrainConfig.betas must be in [0, 1), got {self.betas!r}')
        if not 0.0 < self.ema_max_decay < 1.0 or self.ema_power <= 0:
            raise ConfigError(f'TrainConfig.ema_max_decay must be in (0, 1) and ema_power > 0, '
                              f'got {self.ema_max_decay!r}, {self.ema_power!r}')
        if self.device not in DEVICES:
            raise ConfigError(f'TrainConfig.device must be one of {DEVICES}, '
                              f'got {self.device!r}')
        if self.max_demos is not None and self.max_demos <= 0:
            raise ConfigError(f'TrainConfig.max_demos must be > 0, got {self.max_demos!r}')
        if not isinstance(self.overrides, dict):
            raise ConfigError(f'TrainConfig.overrides must be a mapping, '
                              f'got {self.overrides!r}')
        self.policy_config()  # fail early on a bad preset or override

    def policy_config(self) -> PolicyConfig:
        """Build the :class:`PolicyConfig`: the preset with ``overrides`` merged in."""
        base = config_to_dict(make_preset(self.preset))
        return config_from_dict(PolicyConfig, _merge(base, self.overrides, 'overrides'),
                                'TrainConfig.overrides')


def _merge(base: dict, update: dict, where: str) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if key not in merged:
            raise ConfigError(f'TrainConfig.{where}.{key} is not a policy field; valid: '
                              f'{sorted(merged)}')
        if isinstance(merged[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f'TrainConfig.{where}.{key} must be a mapping, '
                                  f'got {value!r}')
            merged[key] = _merge(merged[key], value, f'{where}.{key}')
        else:
            merged[key] = value
    return merged


def load_train_config(path: str, **changes) -> TrainConfig:
    """Read a training YAML file; ``changes`` replace top-level fields (command line)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path} must hold a mapping of TrainConfig fields')
    data.update({k: v for k, v in changes.items() if v is not None})
    try:
        return config_from_dict(TrainConfig, data)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f'{path}: {exc}') from exc
