"""Pruner training data from demonstrations (the method's real-robot recipe, tts_method §8.2).

A real-robot team has demonstrations, not simulator rollouts. The pruner can then be trained
to make the sparse sampler reproduce the *demonstrated* action chunks: each frame is one
control step of a demonstration, spaced ``frame_stride`` steps apart (default
``n_action_steps``, as the policy is deployed, so the rollout cache is carried across frames
as it is at run time), with

- the observation window of the frame's T_o newest steps (left-padded with step 0);
- the target ``action_pred``: the demonstrated actions of the horizon, indices
  ``s - T_o + 1 .. s - T_o + T_a`` (clipped to the episode, i.e. padded with the first/last
  action), the policy's own indexing;
- initial noise and DDPM step noise drawn from a per-episode seed (zeros for DDIM).

The output is a rollout file (:mod:`rollouts` layout, ``source='demonstrations'``), so
``train-pruner`` trains on it unchanged. Unlike rollouts, the targets are not the dense
policy's own samples, so the fidelity loss has a floor (the policy's imitation error).
"""

from typing import Dict
from typing import Optional

import numpy as np
from sparse_policy_node.core import keys
from sparse_policy_node.training.dataset import load_episodes
from sparse_policy_node.training.rollouts import policy_fingerprint
from sparse_policy_node.training.rollouts import RolloutWriter
import torch


def episode_frames(episode: Dict[str, np.ndarray], obs_keys, n_obs_steps: int, horizon: int,
                   stride: int) -> dict:
    """Frames of one demonstration every ``stride`` steps.

    Args:
        episode: ``'action'`` (L, A) and each of ``obs_keys`` (L, ...), policy layout.

    Returns:
        ``obs`` {key: (F, T_o, ...)} and ``action_pred`` (F, T_a, A) float32.
    """
    L = len(episode[keys.ACTION])
    steps = np.arange(0, L, stride)  # (F,) newest observation index of each frame
    offsets_obs = np.arange(n_obs_steps) - (n_obs_steps - 1)  # (T_o,)
    offsets_act = np.arange(horizon) - (n_obs_steps - 1)  # (T_a,)
    obs_idx = np.clip(steps[:, None] + offsets_obs[None], 0, L - 1)  # (F, T_o)
    act_idx = np.clip(steps[:, None] + offsets_act[None], 0, L - 1)  # (F, T_a)
    return {'obs': {k: episode[k][obs_idx] for k in obs_keys},
            'action_pred': episode[keys.ACTION][act_idx].astype(np.float32)}


def demos_to_rollouts(model_dir: str, demos: str, out: str, sampler: Optional[str] = None,
                      steps: Optional[int] = None, frame_stride: Optional[int] = None,
                      seed: int = 0, max_demos: Optional[int] = None) -> dict:
    """Write a rollout file whose targets are the demonstrated chunks of ``demos``.

    Args:
        model_dir: the policy the pruner is for (its observation keys and sizes).
        demos: robomimic-layout HDF5 (``demos`` / ``dataset-from-bag`` output).
        out: rollout file to write.
        sampler, steps: schedule the pruner is trained for (default: the model's).
        frame_stride: steps between frames (default: the model's ``n_action_steps``).
        seed: noise seed; episode i uses ``seed + i``.

    Returns:
        a summary: episodes, frames per episode, schedule.
    """
    from sparse_policy_node.core.checkpoint import load_policy_config
    config = load_policy_config(model_dir)
    t = config.transformer
    sampler = sampler or config.scheduler.sampler
    steps = steps or config.scheduler.num_inference_steps
    stride = frame_stride or config.n_action_steps
    if stride < 1:
        raise ValueError(f'frame_stride must be >= 1, got {stride}')
    obs_keys = [keys.image_key(c) for c in config.obs.vision.cameras]
    obs_keys += [k for k, _ in config.obs.lowdim]
    episodes = load_episodes(demos, obs_keys, max_demos)
    if not episodes:
        raise ValueError(f'{demos} holds no demonstrations')
    action_dim = episodes[0][keys.ACTION].shape[1]
    if action_dim != t.action_dim:
        raise ValueError(f'{demos} has {action_dim}-D actions, the model {t.action_dim}-D')
    attrs = {'model_dir': model_dir, 'policy_sha256': policy_fingerprint(model_dir),
             'task': 'demonstrations', 'source': 'demonstrations', 'demos': demos,
             'sampler': sampler, 'num_inference_steps': steps,
             'n_action_steps': config.n_action_steps, 'n_obs_steps': t.n_obs_steps,
             'frame_stride': stride}
    frames = []
    with RolloutWriter(out, attrs) as writer:
        for i, episode in enumerate(episodes):
            record = episode_frames(episode, obs_keys, t.n_obs_steps, t.horizon, stride)
            F = len(record['action_pred'])
            g = torch.Generator().manual_seed(seed + i)
            record['noise'] = torch.randn((F, t.horizon, t.action_dim),
                                          generator=g).numpy()  # (F, T_a, A)
            step_noise = torch.randn((F, steps, t.horizon, t.action_dim), generator=g)
            if sampler != 'ddpm':  # DDIM (eta 0) takes no variance noise
                step_noise.zero_()
            record['step_noise'] = step_noise.numpy()  # (F, K, T_a, A)
            writer.add(record, {'seed': seed + i, 'success': True,
                                'env_steps': len(episode[keys.ACTION])})
            frames.append(F)
    return {'episodes': len(frames), 'frames': frames, 'sampler': sampler,
            'num_inference_steps': steps, 'frame_stride': stride, 'out': out}
