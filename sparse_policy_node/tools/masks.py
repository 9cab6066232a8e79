"""``sparse-policy masks``: picture the gates of a recorded episode, one panel per control step.

The episode's recorded observation windows and noise are replayed through the sparse engine
at batch 1 (open loop: the observations are those of the dense rollout), and the executed
(K, U) gate map of every chunk is drawn as denoising steps x units coloured by choice
(compute / reuse forward / timestep / rollout). The first chunk is dense by rule. Per chunk
the command also prints the realized sparsity and the L1 distance (raw action units) of the
sparse chunk from the recorded dense one.
"""

import argparse
import json

from sparse_policy_node.core.config import REUSE_DIRECTIONS
from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_out_path
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import check_rollouts
from sparse_policy_node.tools.args import CommandError
from sparse_policy_node.tools.args import ListAction
from sparse_policy_node.tools.args import reuse_direction


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    add_model_argument(parser, default='models/lift', help_text='model directory with a pruner')
    parser.add_argument('--rollouts', required=True, help='rollout file (sparse-policy rollouts)')
    parser.add_argument('--episode', type=int, default=0, help='episode index in the file')
    parser.add_argument('--out', required=True, help='output PNG path')
    parser.add_argument('--max-chunks', type=int, default=8, help='panels to draw at most')
    parser.add_argument('--target-sparsity', type=float, default=-1.0,
                        help='dial value; negative uses the learned argmax gates')
    parser.add_argument('--directions', action=ListAction, default=list(REUSE_DIRECTIONS),
                        check=reuse_direction,
                        help='reuse directions allowed, space or comma separated')
    parser.add_argument('--rollout-max-age', type=int, default=None,
                        help='cache aging (0: never; default: the max age the pruner of the '
                             "rollouts' schedule was trained with)")
    parser.add_argument('--threads', type=int, default=1, help='torch threads')


def check_args(args: argparse.Namespace) -> dict:
    """Check the values, the model, the rollout file and the episode; return the file's attrs."""
    check_range(args.max_chunks, '--max-chunks', low=1)
    check_range(args.target_sparsity, '--target-sparsity', high=0.99,
                hint='give a fraction in [0, 0.99], or a negative value for the learned gates')
    check_range(args.rollout_max_age, '--rollout-max-age', low=0, hint='0 never expires')
    check_model_dir(args.model, pruners=True)
    attrs = check_rollouts(args.rollouts)
    import h5py
    with h5py.File(args.rollouts, 'r') as f:
        episodes = len(f['episodes']) if 'episodes' in f else 0
    if not 0 <= args.episode < episodes:
        raise CommandError(f'--episode must be in [0, {episodes}) for {args.rollouts}, got '
                           f'{args.episode}')
    check_out_path(args.out, '--out')
    return attrs


def replay_gates(engine, episode, max_chunks: int):
    """Replay a recorded episode through ``engine``; return per-chunk gate maps and stats.

    Args:
        engine: a :class:`SparseEngine` on the rollout's schedule.
        episode: one record of :func:`rollouts.load_rollouts`.
        max_chunks: stop after this many chunks.

    Returns:
        (list of (K, U) gate maps, list of per-chunk dicts with ``sparsity`` and ``l1``).
    """
    import torch
    engine.reset()
    maps, rows = [], []
    frames = min(len(episode['action_pred']), max_chunks)
    for f in range(frames):
        obs = {k: torch.from_numpy(v[f])[None] for k, v in episode['obs'].items()}
        noise = torch.from_numpy(episode['noise'][f])[None]  # (1, T_a, A)
        step_noise = torch.from_numpy(episode['step_noise'][f])[:, None]  # (K, 1, T_a, A)
        out = engine.predict_action(obs, noise=noise, step_noise=step_noise)
        target = torch.from_numpy(episode['action_pred'][f])
        maps.append(engine.last_gates.clone())
        rows.append({'chunk': f, 'dense': out['stats']['dense'],
                     'sparsity': round(out['stats']['realized_sparsity'], 4),
                     'l1': round(float((out['action_pred'][0] - target).abs().mean()), 5)})
    return maps, rows


def run(args: argparse.Namespace) -> int:
    """Draw the gate maps of one recorded episode."""
    import torch
    from sparse_policy_node.core.checkpoint import for_schedule
    from sparse_policy_node.core.checkpoint import load_pruners
    from sparse_policy_node.core.checkpoint import trained_max_age
    from sparse_policy_node.core.config import RuntimeConfig
    from sparse_policy_node.core.engine import load_engine
    from sparse_policy_node.core.transformer import UNIT_KINDS
    from sparse_policy_node.tools.mask_plot import plot_gate_maps
    from sparse_policy_node.training.rollouts import load_rollouts
    attrs = check_args(args)
    torch.set_num_threads(args.threads)
    schedule = (str(attrs['sampler']), int(attrs['num_inference_steps']))
    max_age = args.rollout_max_age
    if max_age is None:
        max_age = trained_max_age(for_schedule(load_pruners(args.model), schedule))
    runtime = RuntimeConfig(gate_source='pruner', target_sparsity=args.target_sparsity,
                            directions=tuple(args.directions), sampler=schedule[0],
                            num_inference_steps=schedule[1], rollout_max_age=max_age)
    engine = load_engine(args.model, runtime=runtime)
    episode = load_rollouts(args.rollouts)[args.episode]
    maps, rows = replay_gates(engine, episode, args.max_chunks)
    engine.close()
    units = [f'l{b // 3}.{UNIT_KINDS[b % 3]}' for b in range(maps[0].shape[1])]
    labels = [f'control step {r["chunk"]}' + (' (dense)' if r['dense'] else '') for r in rows]
    dial = 'learned gates' if args.target_sparsity < 0 else f'dial {args.target_sparsity}'
    plot_gate_maps(maps, args.out, units, chunk_labels=labels,
                   title=f'{args.model}: {dial}, episode seed {episode["attrs"].get("seed")}, '
                         f'{attrs["sampler"]}-{attrs["num_inference_steps"]}')
    for row in rows:
        print(json.dumps(row))
    print(f'gate maps -> {args.out}')
    return 0
