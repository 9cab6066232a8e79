"""``sparse-policy rollouts``: record closed-loop rollouts of the dense policy for pruner training.

The pruner is trained to reproduce the dense policy's own chunks (tts_method.md §8.2, §14.9),
so the data are rollouts of the deployed (EMA) weights in the simulator. One *frame* is one
control step, i.e. one ``predict_action`` call every ``n_action_steps`` environment steps,
exactly as :func:`evaluate.run_episode` (and the ROS node) space them; the reference code's
raw-frame spacing bug (§13.6) cannot happen because the recorder *is* the evaluation loop.

Per frame the file keeps the observation window fed to the policy, the initial noise, the
per-step DDPM variance noise and the dense ``action_pred``, so the training target is
noise-matched: with all gates set to compute, the sparse sampler reproduces the target up to
float rounding (the reference trains against an independent sample, which leaves an
irreducible loss floor, §13.13). Only successful episodes are kept by default.

File layout (HDF5)::

    /                     attrs: format_version, model_dir, policy_sha256, task, sampler,
                                 num_inference_steps, n_action_steps, n_obs_steps
    /episodes/ep_N        attrs: seed, success, env_steps, num_frames
    /episodes/ep_N/obs/<key>      (F, T_o, ...) images uint8 (3, H, W), low-dim float32
    /episodes/ep_N/noise          (F, T_a, A) float32 initial noise
    /episodes/ep_N/step_noise     (F, K, T_a, A) float32 DDPM variance noise (zeros for DDIM)
    /episodes/ep_N/action_pred    (F, T_a, A) float32 dense prediction (unnormalized)
"""

import argparse
from functools import partial
import os
import re
import sys
import time
from typing import Dict
from typing import List
from typing import Optional
from typing import Sequence

import h5py
import numpy as np
from sparse_policy_node.tools.args import add_episode_arguments
from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_episode_arguments
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_out_path
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import check_task
from sparse_policy_node.training.dataset import write_obs_array
from sparse_policy_node.training.parallel import episode_results
import torch
from tqdm import tqdm

FORMAT_VERSION = 1


def policy_fingerprint(model_dir: str) -> str:
    """SHA-256 of a model directory's policy weights."""
    from sparse_policy_node.core.checkpoint import policy_sha256
    return policy_sha256(model_dir)


class RecordingPolicy:
    """Dense sampling with explicit noise that remembers every control step of an episode.

    A policy-like object for :func:`evaluate.run_episode`: noise is drawn from torch's global
    generator (seeded per episode by ``run_episode``), passed explicitly to the policy and
    stored with the observation window and the prediction.
    """

    def __init__(self, policy, sampler: Optional[str] = None, steps: Optional[int] = None):
        self.policy = policy
        sched = policy.config.scheduler
        policy.scheduler.set_timesteps(steps or sched.num_inference_steps,
                                       sampler or sched.sampler)
        self.frames: List[dict] = []

    def reset(self) -> None:
        """Start a new episode: forget the recorded frames."""
        self.frames = []

    def predict_action(self, obs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Sample one dense chunk for a (1, T_o, ...) window and record it."""
        policy, sched = self.policy, self.policy.scheduler
        shape = policy.action_shape(1)  # (1, T_a, A)
        noise = torch.randn(shape)
        step_noise = torch.randn((sched.num_steps, *shape))  # (K, 1, T_a, A)
        if not sched.needs_step_noise():
            step_noise.zero_()
        out = policy.predict_action(obs, noise=noise, step_noise=step_noise)
        self.frames.append({
            'obs': {k: v[0].cpu().numpy() for k, v in obs.items()},
            'noise': noise[0].numpy(),
            'step_noise': step_noise[:, 0].numpy(),
            'action_pred': out['action_pred'][0].cpu().numpy().astype(np.float32),
        })
        return out


def stack_frames(frames: Sequence[dict]) -> dict:
    """Stack per-frame records into per-episode arrays (leading axis F)."""
    return {
        'obs': {k: np.stack([f['obs'][k] for f in frames]) for k in frames[0]['obs']},
        'noise': np.stack([f['noise'] for f in frames]).astype(np.float32),
        'step_noise': np.stack([f['step_noise'] for f in frames]).astype(np.float32),
        'action_pred': np.stack([f['action_pred'] for f in frames]).astype(np.float32),
    }


class RolloutWriter:
    """Write recorded episodes to an HDF5 rollout file (context manager)."""

    def __init__(self, path: str, attrs: dict):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = h5py.File(path, 'w')
        self.file.attrs['format_version'] = FORMAT_VERSION
        for key, value in attrs.items():
            self.file.attrs[key] = value
        self.episodes = self.file.create_group('episodes')
        self.count = 0

    def add(self, episode: dict, attrs: dict) -> str:
        """Write one episode (arrays from :func:`stack_frames`); return its group name."""
        name = f'ep_{self.count}'
        group = self.episodes.create_group(name)
        for key, value in attrs.items():
            group.attrs[key] = value
        group.attrs['num_frames'] = len(episode['action_pred'])
        obs = group.create_group('obs')
        for key, value in episode['obs'].items():
            write_obs_array(obs, key, value, image=value.dtype == np.uint8)
        for key in ('noise', 'step_noise', 'action_pred'):
            group.create_dataset(key, data=episode[key])
        self.count += 1
        return name

    def close(self) -> None:
        """Close the file."""
        if self.file:
            self.file.attrs['num_episodes'] = self.count
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _episode_key(name: str) -> int:
    match = re.fullmatch(r'ep_(\d+)', name)
    return int(match.group(1)) if match else -1


def read_rollout_attrs(path: str) -> dict:
    """Return the file-level attributes of a rollout file."""
    with h5py.File(path, 'r') as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    if attrs.get('format_version') != FORMAT_VERSION:
        raise ValueError(f'{path}: rollout format_version {attrs.get("format_version")!r}, '
                         f'this package reads {FORMAT_VERSION}')
    return attrs


def count_rollouts(path: str) -> int:
    """Return the number of episodes in a rollout file (without reading them)."""
    read_rollout_attrs(path)
    with h5py.File(path, 'r') as f:
        return len(f['episodes'])


def rollout_lengths(path: str) -> List[int]:
    """Return the control steps (frames) of every episode, in file order, without reading them."""
    read_rollout_attrs(path)
    with h5py.File(path, 'r') as f:
        return [len(f['episodes'][name]['noise'])
                for name in sorted(f['episodes'].keys(), key=_episode_key)]


def load_rollouts(path: str) -> List[dict]:
    """Read every episode of a rollout file into memory.

    Returns:
        per episode a dict with ``obs`` ({key: (F, T_o, ...)}), ``noise`` (F, T_a, A),
        ``step_noise`` (F, K, T_a, A), ``action_pred`` (F, T_a, A) and ``attrs``.
    """
    read_rollout_attrs(path)
    episodes = []
    with h5py.File(path, 'r') as f:
        for name in sorted(f['episodes'].keys(), key=_episode_key):
            group = f['episodes'][name]
            episodes.append({
                'name': name,
                'obs': {k: group['obs'][k][()] for k in group['obs']},
                'noise': group['noise'][()],
                'step_noise': group['step_noise'][()],
                'action_pred': group['action_pred'][()],
                'attrs': {k: (v.item() if isinstance(v, np.generic) else v)
                          for k, v in group.attrs.items()},
            })
    return episodes


# ==== collection ====

_WORKER = {}


def _init_worker(model_dir, task, max_steps, sampler, steps, threads):
    from sparse_policy_node.training.evaluate import init_episode_worker
    init_episode_worker(_WORKER, model_dir, task, max_steps, threads,
                        partial(RecordingPolicy, sampler=sampler, steps=steps))


def _record(seed):
    from sparse_policy_node.training.evaluate import run_episode
    recorder = _WORKER['policy']
    result = run_episode(_WORKER['env'], recorder, seed, _WORKER['n_obs_steps'])
    return result, stack_frames(recorder.frames)


def record_rollouts(model_dir: str, out: str, num: int, seed_start: int,
                    task: Optional[str] = None, max_attempts: Optional[int] = None,
                    sampler: Optional[str] = None, steps: Optional[int] = None,
                    max_steps: Optional[int] = None, keep_failures: bool = False,
                    workers: int = 1, threads: int = 1, progress: bool = True) -> dict:
    """Roll the dense policy out on consecutive seeds and keep ``num`` episodes.

    Args:
        model_dir: model directory (its weights are the deployed EMA weights).
        out: output HDF5 path.
        num: episodes to keep (successful ones unless ``keep_failures``).
        seed_start: first reset seed; keep it disjoint from training and evaluation seeds.
        task: simulator task (default: the model's).
        max_attempts: seeds to try at most (default ``2 * num``).
        sampler: sampler override (default: the model's).
        steps: K override (default: the model's).
        max_steps: episode limit (default: the task's).
        keep_failures: also keep failed episodes (e.g. for mask pictures).
        workers: simulator processes.
        threads: torch threads per process.
        progress: show a progress bar.

    Returns:
        summary with ``kept``, ``attempts``, ``failed_seeds``, ``frames`` and ``seconds``.
    """
    from sparse_policy_node.core.checkpoint import load_policy_config
    from sparse_policy_node.training.evaluate import model_task
    config = load_policy_config(model_dir)
    task = task or model_task(model_dir)
    sampler = sampler or config.scheduler.sampler
    steps = steps or config.scheduler.num_inference_steps
    max_attempts = max_attempts or 2 * num
    seeds = range(seed_start, seed_start + max_attempts)
    attrs = {'model_dir': os.path.abspath(model_dir), 'policy_sha256': policy_fingerprint(
        model_dir), 'task': task, 'sampler': sampler, 'num_inference_steps': steps,
        'n_action_steps': config.n_action_steps,
        'n_obs_steps': config.transformer.n_obs_steps, 'seed_start': seed_start}
    init = (model_dir, task, max_steps, sampler, steps, threads)
    start, attempts, failed, frames = time.time(), 0, [], 0
    bar = tqdm(total=num, desc=f'rollouts {task}', unit='ep', disable=not progress,
               file=sys.stderr)
    with RolloutWriter(out, attrs) as writer:
        with bar, episode_results(_record, seeds, workers, _init_worker, init,
                                  close_local=lambda: _WORKER['env'].close()) as results:
            for result, episode in results:
                attempts += 1
                if not result['success']:
                    failed.append(result['seed'])
                if result['success'] or keep_failures:
                    writer.add(episode, {'seed': result['seed'], 'success': result['success'],
                                         'env_steps': result['steps']})
                    frames += len(episode['action_pred'])
                    bar.update(1)
                bar.set_postfix(attempts=attempts, failed=len(failed))
                if writer.count >= num:
                    break
        kept = writer.count
    return {'out': out, 'kept': kept, 'attempts': attempts, 'failed_seeds': failed,
            'frames': frames, 'success_rate': (attempts - len(failed)) / max(attempts, 1),
            'seconds': time.time() - start}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    add_model_argument(parser, default='models/lift')
    parser.add_argument('--out', required=True, help='output .hdf5 path')
    parser.add_argument('--num', type=int, default=32, help='episodes to keep')
    parser.add_argument('--seed-start', type=int, default=50000,
                        help='first reset seed; keep it disjoint from the policy training '
                             'seeds and from the evaluation seeds (100000+)')
    parser.add_argument('--max-attempts', type=int, help='seeds to try (default 2 * num)')
    parser.add_argument('--keep-failures', action='store_true',
                        help='also keep failed episodes')
    add_episode_arguments(parser)


def check_args(args: argparse.Namespace) -> None:
    """Check the values, the model, its schedule and the task before any episode starts."""
    from sparse_policy_node.training.evaluate import model_task
    check_range(args.num, '--num', low=1)
    check_range(args.max_attempts, '--max-attempts', low=1)
    check_episode_arguments(args)
    config = check_model_dir(args.model)
    check_range(args.steps, '--steps', high=config.scheduler.num_train_timesteps,
                hint="K cannot exceed the model's training timesteps")
    check_task(args.task or model_task(args.model))
    check_out_path(args.out, '--out')


def run(args: argparse.Namespace) -> int:
    """Record rollouts as the arguments say."""
    check_args(args)
    summary = record_rollouts(args.model, args.out, args.num, args.seed_start, args.task,
                              args.max_attempts, args.sampler, args.steps, args.max_steps,
                              args.keep_failures, args.workers, args.threads)
    print(f'kept {summary["kept"]} episodes ({summary["frames"]} control steps) of '
          f'{summary["attempts"]} tried, dense success {summary["success_rate"]:.0%}, '
          f'{summary["seconds"]:.0f} s -> {args.out}')
    if summary['failed_seeds']:
        print(f'failed seeds: {summary["failed_seeds"]}')
    return 0 if summary['kept'] >= args.num else 1
