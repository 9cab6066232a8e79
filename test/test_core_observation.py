"""Observation windows from per-step arrays, and runtime changes that keep the rest."""

import numpy as np
import pytest
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.engine import SparseEngine
from sparse_policy_node.core.observation import observation_window
from sparse_policy_node.core.policy import ObservationError
import torch


def one_step(policy, value=0.0):
    """One step of every model key: channels-last uint8 images, float low-dim vectors."""
    step = {}
    for key, shape in policy.expected_obs_shapes().items():
        if key.endswith('_image'):
            step[key] = np.full((*shape[2:], 3), int(value) % 256, np.uint8)
        else:
            step[key] = np.full(shape[1:], value)
    return step


def test_window_stacks_the_last_steps_and_repeats_the_first_when_short(tiny_policy):
    n_obs = tiny_policy.config.transformer.n_obs_steps
    assert n_obs == 2
    window = observation_window(tiny_policy, one_step(tiny_policy, 3.0))
    assert tiny_policy.check_obs(window) == 1
    key = tiny_policy.config.obs.lowdim[0][0]
    assert window[key].dtype == torch.float32 and (window[key] == 3.0).all()
    steps = [one_step(tiny_policy, v) for v in (1.0, 2.0, 3.0)]
    window = observation_window(tiny_policy, steps)
    assert window[key][0, :, 0].tolist() == [2.0, 3.0]     # the last T_o steps, oldest first
    image = [k for k in window if k.endswith('_image')][0]
    assert window[image].dtype == torch.uint8 and window[image].shape[2] == 3  # (1, T_o, 3, ..)
    assert window[image][0, :, 0, 0, 0].tolist() == [2, 3]


def test_window_names_missing_keys_bad_shapes_and_nan(tiny_policy):
    step = one_step(tiny_policy)
    key = tiny_policy.config.obs.lowdim[0][0]
    with pytest.raises(ObservationError, match=f'missing key {key!r}'):
        observation_window(tiny_policy, {k: v for k, v in step.items() if k != key})
    with pytest.raises(ObservationError, match=f'{key!r} has shape'):
        observation_window(tiny_policy, dict(step, **{key: np.zeros(99)}))
    with pytest.raises(ObservationError, match='NaN or inf'):
        observation_window(tiny_policy, dict(step, **{key: np.full(step[key].shape, np.nan)}))
    with pytest.raises(ObservationError, match='no observation step'):
        observation_window(tiny_policy, [])


def test_engine_predicts_from_a_window_built_from_arrays(tiny_policy):
    engine = SparseEngine(tiny_policy, None, RuntimeConfig(sparsity_enabled=False,
                                                           num_inference_steps=4))
    out = engine.predict_action(engine.observation([one_step(tiny_policy)]))
    assert out['action'].shape[:2] == (1, tiny_policy.config.n_action_steps)
    assert torch.isfinite(out['action']).all()


def test_runtime_replace_keeps_the_other_knobs_and_validates():
    served = RuntimeConfig(sampler='ddim', num_inference_steps=5, rollout_max_age=3)
    changed = served.replace(target_sparsity=0.8, gate_source='static')
    assert (changed.sampler, changed.num_inference_steps, changed.rollout_max_age) == \
        ('ddim', 5, 3)
    assert changed.target_sparsity == 0.8 and served.target_sparsity == -1.0
    with pytest.raises(ConfigError, match="no field 'sparsity'"):
        served.replace(sparsity=0.8)
    with pytest.raises(ConfigError, match='target_sparsity'):
        served.replace(target_sparsity=2.0)
