"""``sparse-policy similarity``: how alike a unit's outputs are across control steps.

The rollout cache (direction R of tts_method.md §6) reuses, at control step r, the output
that unit b produced at the same denoising step k in an earlier control step. That pays off
only if those outputs are alike. This command records a few closed-loop episodes of the dense
policy and measures it, as the paper's rollout-similarity figure does:

- for every (denoising step k, unit b): the cosine similarity of the unit's output at control
  step r with its output at control step r - 1, averaged over the control steps of every
  episode (a K x U heat map);
- against the control-step distance d = 1 .. ``--max-distance``: the same similarity between
  control steps r and r - d, averaged over (k, b) and per unit kind (SA, CA, FFN);
- for comparison, the candidates of the two other reuse directions at the same (r, k, b):
  the unit's output at step k - 1 of the same chunk (T) and the output of the same kind of
  unit one layer below at step k (F, the previous layer; the engine's F cache holds the most
  recently computed one, which under dense sampling is that one).

A unit's output is its branch output before the residual add, ``(T_a, D)``, flattened to one
vector; the similarity is that of the two vectors. Pairs never cross an episode. Noise comes
from torch's global generator, seeded per episode as in ``eval``, so the episodes are those
``eval --variants dense`` runs on the same seeds and schedule.

Output in ``--out``: ``similarity.json`` (every number, the episodes, the command) and
``similarity.png`` (the heat map and the curves over distance).
"""

import argparse
from collections import deque
import json
import os
import sys
from typing import Dict
from typing import List
from typing import Optional

import numpy as np
from sparse_policy_node.core import keys
from sparse_policy_node.tools.args import add_episode_arguments
from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_episode_arguments
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import check_task
from sparse_policy_node.tools.args import CommandError
import torch
from tqdm import tqdm

UNIT_KINDS = ('sa', 'ca', 'ffn')  # unit b = 3 l + j, j indexing this tuple


def unit_vectors(features: torch.Tensor) -> torch.Tensor:
    """Flatten and L2-normalize unit outputs.

    Args:
        features: (K, U, T_a, D) branch outputs of one chunk.

    Returns:
        (K, U, T_a * D) float32 unit vectors (a zero output stays zero).
    """
    flat = features.float().flatten(2)  # (K, U, T_a * D)
    return flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class SimilarityStats:
    """Running sums of cosine similarities over the chunks of several episodes.

    Feed each chunk's unit outputs with :meth:`add_chunk`, and call :meth:`new_episode` at
    every episode start (pairs never cross episodes). Only the last ``max_distance`` chunks
    are kept, so memory does not grow with episode length.
    """

    def __init__(self, num_steps: int, num_units: int, max_distance: int):
        K, U = num_steps, num_units
        self.max_distance = max_distance
        self.rollout_sum = np.zeros((max_distance, K, U))  # distance d at index d - 1
        self.rollout_count = np.zeros(max_distance, dtype=np.int64)
        self.timestep_sum = np.zeros((K, U))
        self.forward_sum = np.zeros((K, U))
        self.chunks = 0
        self.recent: deque = deque(maxlen=max_distance)

    def new_episode(self) -> None:
        """Forget the previous episode's chunks."""
        self.recent.clear()

    def add_chunk(self, features: torch.Tensor) -> None:
        """Add one chunk's (K, U, T_a, D) unit outputs."""
        v = unit_vectors(features)  # (K, U, F)
        for d, earlier in enumerate(reversed(self.recent), start=1):
            self.rollout_sum[d - 1] += (v * earlier).sum(-1).double().numpy()
            self.rollout_count[d - 1] += 1
        self.timestep_sum[1:] += (v[1:] * v[:-1]).sum(-1).double().numpy()
        self.forward_sum[:, 3:] += (v[:, 3:] * v[:, :-3]).sum(-1).double().numpy()
        self.chunks += 1
        self.recent.append(v)

    def summary(self) -> dict:
        """Mean similarities; entries without any pair are None.

        Returns:
            ``rollout_consecutive`` (K, U) for d = 1, ``rollout_by_distance`` per unit kind
            and ``all`` (one value per d), ``rollout_by_distance_per_unit`` (U, max_distance),
            ``pairs_by_distance``, ``timestep_neighbour`` and ``forward_neighbour`` (K, U;
            step 0 and the first layer have no such neighbour), and the scalar means.
        """
        count = self.rollout_count[:, None, None]
        with np.errstate(invalid='ignore', divide='ignore'):
            rollout = np.where(count > 0, self.rollout_sum / np.maximum(count, 1), np.nan)
        K, U = rollout.shape[1:]
        timestep = self.timestep_sum / max(self.chunks, 1)
        timestep[0] = np.nan
        forward = self.forward_sum / max(self.chunks, 1)
        forward[:, :3] = np.nan
        by_distance = {'all': rollout.mean(axis=(1, 2))}
        for j, kind in enumerate(UNIT_KINDS):
            by_distance[kind] = rollout[:, :, j::3].mean(axis=(1, 2))
        return {
            'chunks': self.chunks,
            'pairs_by_distance': self.rollout_count.tolist(),
            'rollout_consecutive': _nested(rollout[0]),
            'rollout_by_distance': {k: _nested(v) for k, v in by_distance.items()},
            'rollout_by_distance_per_unit': _nested(rollout.mean(axis=1).T),
            'timestep_neighbour': _nested(timestep),
            'forward_neighbour': _nested(forward),
            'mean_rollout_consecutive': _scalar(np.nanmean(rollout[0]) if K * U else np.nan),
            'mean_timestep_neighbour': _scalar(np.nanmean(timestep[1:]) if K > 1 else np.nan),
            'mean_forward_neighbour': _scalar(np.nanmean(forward[:, 3:]) if U > 3 else np.nan),
        }


def _scalar(x) -> Optional[float]:
    return None if not np.isfinite(x) else round(float(x), 5)


def _nested(a: np.ndarray):
    if a.ndim == 0:
        return _scalar(a)
    return [_nested(x) for x in a]


class RecordingDensePolicy:
    """Dense sampling that hands every unit's output of every step to :class:`SimilarityStats`.

    Policy-like (``reset()``, ``predict_action(obs)``), so :func:`evaluate.run_episode` runs
    it. The loop is :func:`core.sampler.sample_dense` with the unit outputs kept, so the
    actions are the dense policy's (a test checks it).
    """

    def __init__(self, policy, stats: SimilarityStats, sampler: str, steps: int):
        self.policy = policy
        self.stats = stats
        policy.scheduler.set_timesteps(steps, sampler)

    def reset(self) -> None:
        """Start a new episode: no pair with the previous episode's chunks."""
        self.stats.new_episode()

    @torch.no_grad()
    def predict_action(self, obs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One dense chunk (noise from torch's global generator); records the unit outputs."""
        from sparse_policy_node.core.sampler import compute_unit
        from sparse_policy_node.core.sampler import initial_noise
        policy, model, sched = self.policy, self.policy.transformer, self.policy.scheduler
        B = policy.check_obs(obs)
        cond = policy.encode_obs(obs)
        x = initial_noise(policy.action_shape(B), None, cond.device, cond.dtype)
        time_mem, obs_mem = model.encode_condition_parts(sched.timesteps, cond)
        kv_all = model.memory_kv_all_steps(time_mem, obs_mem)
        outputs = []
        for k in range(sched.num_steps):
            h = model.embed_sample(x.to(model.pos_emb.dtype))
            step = []
            for b in range(model.num_units):
                d = compute_unit(model, b, h, kv_all, k)  # (B, T_a, D)
                h = h + d
                step.append(d[0])
            outputs.append(torch.stack(step))  # (U, T_a, D)
            eps = model.output(h).to(x.dtype)
            x = sched.step(eps, k, x, None, None)
        self.stats.add_chunk(torch.stack(outputs))  # (K, U, T_a, D)
        action_pred = policy.normalizer.unnormalize(keys.ACTION, x)
        return {'action_pred': action_pred, 'action': policy.chunk_from_prediction(action_pred)}


def record_similarity(model_dir: str, seeds: List[int], task: str, sampler: str, steps: int,
                      max_distance: int, max_steps: Optional[int] = None,
                      progress: bool = True) -> dict:
    """Run one dense episode per seed in the simulator and summarize the similarities.

    Returns:
        :meth:`SimilarityStats.summary` plus ``episodes`` (per seed: success, steps,
        chunks), ``unit_names`` and ``timesteps``.
    """
    from sparse_policy_node.training.evaluate import init_episode_worker
    from sparse_policy_node.training.evaluate import run_episode
    worker = {}
    init_episode_worker(worker, model_dir, task, max_steps, torch.get_num_threads(),
                        lambda policy: policy)
    policy = worker['policy']
    stats = SimilarityStats(steps, policy.transformer.num_units, max_distance)
    recorder = RecordingDensePolicy(policy, stats, sampler, steps)
    episodes = []
    bar = tqdm(seeds, desc=f'similarity {task}', unit='ep', disable=not progress,
               file=sys.stderr)
    try:
        for seed in bar:
            result = run_episode(worker['env'], recorder, seed, worker['n_obs_steps'])
            episodes.append({k: result[k] for k in ('seed', 'success', 'steps', 'chunks')})
            bar.set_postfix(success=sum(e['success'] for e in episodes), chunks=stats.chunks)
    finally:
        worker['env'].close()
    return dict(stats.summary(), episodes=episodes,
                unit_names=policy.transformer.unit_index_names(),
                timesteps=[int(t) for t in policy.scheduler.timesteps])


def plot_similarity(report: dict, path: str) -> None:
    """Heat map of consecutive-control-step similarity (steps x units) and curves over d."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    heat = np.array(report['rollout_consecutive'], dtype=float)  # (K, U)
    fig, (ax_h, ax_d) = plt.subplots(1, 2, figsize=(11, 4.2),
                                     gridspec_kw={'width_ratios': [1.3, 1]})
    low = np.nanmin(heat) if np.isfinite(heat).any() else 0.0
    image = ax_h.imshow(heat, aspect='auto', cmap='viridis', vmin=min(0.0, low), vmax=1.0,
                        interpolation='nearest')
    fig.colorbar(image, ax=ax_h, label='cosine similarity')
    names = report['unit_names']
    ax_h.set_xticks(range(len(names)))
    ax_h.set_xticklabels(names, rotation=90, fontsize=7)
    ax_h.set_xlabel('unit')
    ax_h.set_ylabel('denoising step k (0 = noisiest)')
    ax_h.set_title('control step r vs r - 1, same step and unit', fontsize=9)
    distance = np.arange(1, len(report['pairs_by_distance']) + 1)
    for kind, values in report['rollout_by_distance'].items():
        ax_d.plot(distance, np.array(values, dtype=float), marker='o', ms=3,
                  label=f'rollout (R), {kind}', lw=2 if kind == 'all' else 1)
    for key, label in (('mean_timestep_neighbour', 'previous step (T), d = 0'),
                       ('mean_forward_neighbour', 'layer below (F), d = 0')):
        if report.get(key) is not None:
            ax_d.axhline(report[key], ls=':', color='gray' if 'T' in label else 'black',
                         label=label)
    ax_d.set_xlabel('control-step distance d')
    ax_d.set_ylabel('mean cosine similarity')
    ax_d.grid(alpha=0.3)
    ax_d.legend(fontsize=7)
    fig.suptitle(f'{report["task"]}: dense {report["sampler"]}-{report["num_inference_steps"]}'
                 f', {len(report["episodes"])} episodes from seed {report["seed_start"]}, '
                 f'{report["chunks"]} control steps')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    add_model_argument(parser, default='models/lift')
    parser.add_argument('--episodes', type=int, default=5, help='episodes to record')
    parser.add_argument('--seed-start', type=int, default=100000,
                        help='first reset seed (one episode per seed)')
    add_episode_arguments(parser, workers=False)
    parser.add_argument('--max-distance', type=int, default=10,
                        help='largest control-step distance d measured')
    parser.add_argument('--out', default='runs/similarity',
                        help='report directory (similarity.json, similarity.png)')


def run(args: argparse.Namespace) -> int:
    """Record the episodes, write the JSON and the plot, print the headline numbers."""
    from sparse_policy_node.training.evaluate import model_task
    check_range(args.episodes, '--episodes', low=1)
    check_episode_arguments(args)
    check_range(args.max_distance, '--max-distance', low=1)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CommandError(f'--out {args.out!r} is a file; give a directory for '
                           f'similarity.json and similarity.png')
    config = check_model_dir(args.model)
    task = check_task(args.task or model_task(args.model))
    sampler = args.sampler or config.scheduler.sampler
    steps = args.steps or config.scheduler.num_inference_steps
    check_range(steps, '--steps', high=config.scheduler.num_train_timesteps,
                hint="at most the model's training timesteps")
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seed_start, args.seed_start + args.episodes))
    report = {'model': args.model, 'task': task, 'sampler': sampler,
              'num_inference_steps': steps, 'seed_start': args.seed_start,
              'command': (f'sparse-policy similarity --model {args.model} --episodes '
                          f'{args.episodes} --seed-start {args.seed_start} --sampler {sampler} '
                          f'--steps {steps} --max-distance {args.max_distance}'
                          + (f' --max-steps {args.max_steps}' if args.max_steps else ''))}
    report.update(record_similarity(args.model, seeds, task, sampler, steps,
                                    args.max_distance, args.max_steps))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'similarity.json'), 'w') as f:
        json.dump(report, f, indent=1)
    plot_similarity(report, os.path.join(args.out, 'similarity.png'))
    wins = sum(e['success'] for e in report['episodes'])
    by_d = [(d, v) for d, v in enumerate(report['rollout_by_distance']['all'], start=1)
            if v is not None]
    print(f'{task}: {wins}/{len(seeds)} episodes, {report["chunks"]} control steps, dense '
          f'{sampler}-{steps}')
    print('rollout (R) similarity, same step and unit, by control-step distance: '
          + (', '.join(f'd={d} {v:.3f}' for d, v in by_d) or 'no pairs (one chunk per episode)'))
    print(f'previous denoising step (T): {report["mean_timestep_neighbour"]}; '
          f'layer below (F): {report["mean_forward_neighbour"]}')
    print(f'report -> {os.path.join(args.out, "similarity.json")}')
    return 0
