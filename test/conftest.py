"""Shared fixtures: a tiny policy config and seeded observation batches."""

import os

import pytest
import torch

# Keep test runs off the user's other cores and deterministic.
torch.set_num_threads(1)
os.environ.setdefault('MUJOCO_GL', 'egl')


@pytest.fixture
def tiny_config():
    """Return a seconds-fast PolicyConfig."""
    from sparse_policy_node.core.config import tiny_config as make
    return make()


def make_obs(policy, batch=1, seed=0):
    """Random observation window matching ``policy.expected_obs_shapes()``."""
    g = torch.Generator().manual_seed(seed)
    obs = {}
    for key, shape in policy.expected_obs_shapes().items():
        if key.endswith('_image'):
            obs[key] = torch.randint(0, 256, (batch, *shape), generator=g, dtype=torch.uint8)
        else:
            obs[key] = torch.randn((batch, *shape), generator=g)
    return obs


@pytest.fixture
def tiny_policy(tiny_config):
    """Return a randomly initialised tiny DiffusionPolicy in eval mode."""
    from sparse_policy_node.core.policy import DiffusionPolicy
    torch.manual_seed(0)
    return DiffusionPolicy(tiny_config).eval()


@pytest.fixture
def context(tmp_path):
    """Return an initialised rclpy Context isolated to this test (DDS on localhost, own logs)."""
    import rclpy
    from sparse_policy_node.ros.testing import isolate_ros
    isolate_ros(str(tmp_path / 'log'))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    ctx.try_shutdown()
