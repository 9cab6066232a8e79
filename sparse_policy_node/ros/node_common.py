"""Helpers shared by the policy node's parts (ros/policy_node.py and its mixins)."""

import json
import os
import sys

from sparse_policy_node.core.checkpoint import CheckpointError
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros.launch_args import package_share_dir
import torch


def torch_origin() -> str:
    """Which torch and Python run the node (a ROS workspace may mix apt's and a venv's)."""
    return (f'torch {torch.__version__} from {os.path.dirname(torch.__file__)}, '
            f'python {sys.executable}')


def resolve_model_dir(path: str) -> str:
    """Resolve a relative model path against the working directory, then the share dir."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.join(package_share_dir(), path)


REJECT_LOG_PERIOD_S = 5.0


def describe(exc: BaseException) -> str:
    """Say what went wrong: the message of expected errors, type and message of others."""
    if isinstance(exc, (CheckpointError, ConfigError, conv.ConversionError)):
        return str(exc)
    return f'{type(exc).__name__}: {exc}'


def model_signature(cfg) -> tuple:
    """Return what a replacement model must share with the running one (inputs, actions)."""
    return (tuple(cfg.obs.vision.cameras), tuple(cfg.obs.vision.image_size),
            tuple(cfg.obs.lowdim), cfg.transformer.n_obs_steps, cfg.transformer.action_dim)


def card_contract(card) -> str:
    """Return what a live model swap must keep of the model card (as canonical JSON).

    The action section (space, scaling, delta reference, range, gripper, joint names) and
    the camera preprocessing: the outputs, the safety layer and the image intake were set
    up from them at configure. Rate, source and frames may differ (they are logged).
    """
    if card is None:
        return 'null'
    return json.dumps({'action': card.get('action'), 'cameras': card.get('cameras')},
                      sort_keys=True)
