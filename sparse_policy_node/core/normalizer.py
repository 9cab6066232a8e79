"""Affine per-dimension normalizer stored as buffers, so it travels with the weights.

``normalize(x) = x * scale + offset``. ``'limits'`` maps the data range to [-1, 1] (Diffusion
Policy's range normalizer); ``'identity'`` leaves values unchanged (DP uses it for quaternions).
Ranges narrower than ``RANGE_EPS`` are centred instead of blown up.
"""

from typing import Dict
from typing import Sequence

import numpy as np
import torch
from torch import nn

RANGE_EPS = 1e-4


class Normalizer(nn.Module):
    """Per-key affine normalizer for actions and low-dim observations."""

    def __init__(self, dims: Dict[str, int]):
        super().__init__()
        self.keys = tuple(dims)
        for key, dim in dims.items():
            self.register_buffer(f'{key}__scale', torch.ones(dim))
            self.register_buffer(f'{key}__offset', torch.zeros(dim))

    def _params(self, key: str):
        if key not in self.keys:
            raise KeyError(f'normalizer has no key {key!r}; known keys: {list(self.keys)}')
        return getattr(self, f'{key}__scale'), getattr(self, f'{key}__offset')

    def fit(self, key: str, data: np.ndarray, mode: str = 'limits') -> None:
        """Set the parameters of ``key`` from (N, dim) data with mode limits or identity."""
        scale, offset = self._params(key)
        if mode == 'identity':
            scale.fill_(1.0)
            offset.fill_(0.0)
            return
        if mode != 'limits':
            raise ValueError(f'normalizer mode must be limits or identity, got {mode!r}')
        data = np.asarray(data, dtype=np.float64).reshape(-1, scale.numel())
        lo, hi = data.min(axis=0), data.max(axis=0)
        span = hi - lo
        narrow = span < RANGE_EPS
        new_scale = np.where(narrow, 1.0, 2.0 / np.where(narrow, 1.0, span))
        new_offset = np.where(narrow, -(lo + hi) / 2.0, -1.0 - new_scale * lo)
        scale.copy_(torch.as_tensor(new_scale, dtype=torch.float32))
        offset.copy_(torch.as_tensor(new_offset, dtype=torch.float32))

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) raw values -> normalized values."""
        scale, offset = self._params(key)
        return x * scale + offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) normalized values -> raw values."""
        scale, offset = self._params(key)
        return (x - offset) / scale

    def set_params(self, key: str, scale: Sequence[float], offset: Sequence[float]) -> None:
        """Set the affine parameters of ``key`` explicitly (used by checkpoint import)."""
        s, o = self._params(key)
        s.copy_(torch.as_tensor(scale, dtype=torch.float32).reshape(s.shape))
        o.copy_(torch.as_tensor(offset, dtype=torch.float32).reshape(o.shape))
