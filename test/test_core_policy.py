"""Policy composition: observation validation, training loss, normalizer round trip."""

from conftest import make_obs
import numpy as np
import pytest
from sparse_policy_node.core.normalizer import Normalizer
from sparse_policy_node.core.policy import ObservationError
import torch


def test_missing_key_is_named(tiny_policy):
    obs = make_obs(tiny_policy)
    del obs['robot0_eef_pos']
    with pytest.raises(ObservationError, match='robot0_eef_pos'):
        tiny_policy.predict_action(obs)


def test_wrong_shape_is_named(tiny_policy):
    obs = make_obs(tiny_policy)
    obs['agentview_image'] = obs['agentview_image'][..., :20]
    with pytest.raises(ObservationError, match='agentview_image.*expected'):
        tiny_policy.predict_action(obs)


def test_nonfinite_state_is_rejected(tiny_policy):
    obs = make_obs(tiny_policy)
    obs['robot0_gripper_qpos'][0, 1, 0] = float('nan')
    with pytest.raises(ObservationError, match='NaN'):
        tiny_policy.predict_action(obs)


def test_training_loss_is_finite_and_has_gradients(tiny_policy):
    tiny_policy.train()
    obs = make_obs(tiny_policy, batch=4)
    action = torch.randn(4, 6, 7)
    loss = tiny_policy.compute_loss(obs, action, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert tiny_policy.transformer.head.weight.grad.abs().sum() > 0
    assert tiny_policy.obs_encoder.obs_nets['agentview'].linear.weight.grad.abs().sum() > 0


def test_normalizer_limits_map_to_unit_range_and_back():
    norm = Normalizer({'action': 3})
    data = np.array([[0.0, -2.0, 5.0], [1.0, 2.0, 5.0], [0.5, 0.0, 5.0]])
    norm.fit('action', data)
    x = torch.as_tensor(data, dtype=torch.float32)
    n = norm.normalize('action', x)
    assert torch.allclose(n[:, :2].min(0).values, torch.tensor([-1.0, -1.0]))
    assert torch.allclose(n[:, :2].max(0).values, torch.tensor([1.0, 1.0]))
    assert torch.allclose(n[:, 2], torch.zeros(3))  # constant dim is centred, not blown up
    assert torch.allclose(norm.unnormalize('action', n), x, atol=1e-6)
