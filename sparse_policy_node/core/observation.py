"""Build the engine's observation window from plain per-step arrays.

The engine takes a batch of windows, each key ``(B, T_o, ...)`` (see
``DiffusionPolicy.expected_obs_shapes``). A robot or a simulator produces one step at a time:
``{'agentview_image': (3, H, W) uint8, 'robot0_eef_pos': (3,), ...}``.
:func:`observation_window` stacks the last ``T_o`` steps into a batch-1 window, repeating
the first step while fewer are given (as training does at the start of an episode).
"""

from typing import Dict
from typing import Mapping
from typing import Sequence
from typing import Union

import numpy as np
from sparse_policy_node.core.policy import ObservationError
import torch

Step = Mapping[str, Union[np.ndarray, torch.Tensor, Sequence[float]]]


def _as_array(key: str, value, shape: tuple) -> np.ndarray:
    """Return ``value`` as an array of ``shape`` (images: uint8, else float32)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    image = key.endswith('_image')
    array = np.asarray(value)
    if image and array.ndim == 3 and array.shape[-1] == 3 and array.shape[0] != 3:
        array = array.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    if array.shape != shape:
        raise ObservationError(f'observation {key!r} has shape {array.shape}, expected {shape}'
                               + (' (channels first, or (H, W, 3))' if image else ''))
    if image:
        if array.dtype != np.uint8:
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
                raise ObservationError(f'observation {key!r} must be uint8 or floats in '
                                       f'[0, 255]')
        return np.ascontiguousarray(array, dtype=np.uint8 if array.dtype == np.uint8
                                    else np.float32)
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ObservationError(f'observation {key!r} contains NaN or inf')
    return array


def observation_window(policy, steps: Union[Step, Sequence[Step]]) -> Dict[str, torch.Tensor]:
    """Stack per-step observations into a batch-1 window for ``predict_action``.

    Args:
        policy: a ``DiffusionPolicy`` (or anything with ``expected_obs_shapes()``).
        steps: one step, or a sequence of steps oldest first. Each step maps every model
            key to its array: images ``(3, H, W)`` or ``(H, W, 3)`` uint8 at the model's
            size, low-dim keys ``(dim,)``. The last ``T_o`` steps are used; with fewer, the
            first is repeated in front. Extra keys are ignored.

    Returns:
        ``{key: (1, T_o, ...)}`` tensors: images uint8, low-dim float32.

    Raises:
        ObservationError: no step, a missing key, a wrong shape or non-finite values.
    """
    if isinstance(steps, Mapping):
        steps = [steps]
    steps = list(steps)
    if not steps:
        raise ObservationError('no observation step given')
    shapes = policy.expected_obs_shapes()
    n_obs = next(iter(shapes.values()))[0]
    steps = ([steps[0]] * max(0, n_obs - len(steps)) + steps)[-n_obs:]
    window = {}
    for key, shape in shapes.items():
        missing = [i for i, step in enumerate(steps) if key not in step]
        if missing:
            raise ObservationError(f'observation step is missing key {key!r}; the model '
                                   f'takes {sorted(shapes)}')
        window[key] = torch.from_numpy(np.stack([_as_array(key, step[key], shape[1:])
                                                 for step in steps]))[None]
    return window
