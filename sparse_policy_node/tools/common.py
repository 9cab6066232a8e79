"""Helpers shared by the command-line tools: build a model, make observations, set threads."""

import os
from typing import Optional

import torch


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 keeps the default) and return the number in force."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_model(model_dir: Optional[str], preset: str, device: str, with_pruner: bool,
                seed: int = 0):
    """Load ``model_dir`` or build a random-weight ``preset`` policy (+ pruner) on ``device``.

    Returns:
        (policy, pruners, description string): a model directory's pruners by schedule
        (``{(sampler, K): Pruner}``, empty without one), or the preset's random pruner (or None).
    """
    from sparse_policy_node.core.checkpoint import load_policy
    from sparse_policy_node.core.checkpoint import load_pruners
    from sparse_policy_node.core.config import make_preset
    from sparse_policy_node.core.config import PrunerConfig
    from sparse_policy_node.core.policy import DiffusionPolicy
    from sparse_policy_node.core.pruner import Pruner
    if model_dir:
        policy = load_policy(model_dir, device)
        return policy, load_pruners(model_dir, device), os.path.abspath(model_dir)
    torch.manual_seed(seed)
    policy = DiffusionPolicy(make_preset(preset)).to(device).eval()
    pruner = None
    if with_pruner:
        pruner = Pruner(PrunerConfig(), policy.transformer.num_units,
                        policy.config.transformer.n_emb).to(device).eval()
    return policy, pruner, f'preset:{preset} (random weights)'


def random_obs(policy, seed: int = 0, device: str = 'cpu'):
    """Return an observation window of batch 1 with random images and states."""
    g = torch.Generator().manual_seed(seed)
    obs = {}
    for key, shape in policy.expected_obs_shapes().items():
        if key.endswith('_image'):
            obs[key] = torch.randint(0, 256, (1, *shape), generator=g, dtype=torch.uint8)
        else:
            obs[key] = torch.randn((1, *shape), generator=g) * 0.1
        obs[key] = obs[key].to(device)
    return obs
