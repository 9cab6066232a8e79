r"""``sparse-policy train-pruner``: train the TTS pruner of a model on rollouts or demos.

With ``--demos`` the targets are demonstrated action chunks (see :mod:`demo_targets`), for a
robot without a simulator.

See :mod:`pruner_training` for the method. Example (the shipped Lift pruner)::

    sparse-policy rollouts --model models/lift --out data/lift_rollouts.hdf5 --num 32 \\
        --seed-start 50000 --workers 2
    sparse-policy train-pruner --model models/lift --rollouts data/lift_rollouts.hdf5 \\
        --out runs/lift_pruner --target-sparsity 0.93 --max-minutes 40 --install
"""

import argparse
import json
import os

from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.config import REUSE_DIRECTIONS
from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_file
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import check_rollouts
from sparse_policy_node.tools.args import CommandError
from sparse_policy_node.tools.args import ListAction
from sparse_policy_node.tools.args import reuse_direction
from sparse_policy_node.training.pruner_training import FIDELITY_LOSSES
from sparse_policy_node.training.pruner_training import install_pruner
from sparse_policy_node.training.pruner_training import PrunerTrainConfig
from sparse_policy_node.training.pruner_training import train_pruner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    d = PrunerTrainConfig()
    p = PrunerConfig()
    add_model_argument(parser, default='models/lift',
                       help_text='model directory (its EMA weights are the frozen policy)')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--rollouts', help='rollout file of this model')
    source.add_argument('--demos', help='demonstrations (robomimic HDF5): targets are the '
                                        'demonstrated chunks (real-robot recipe)')
    parser.add_argument('--frame-stride', type=int, default=0,
                        help='with --demos: steps between frames (0: n_action_steps)')
    parser.add_argument('--demo-sampler', choices=('ddpm', 'ddim'),
                        help="with --demos: schedule the pruner is for (default: the model's)")
    parser.add_argument('--demo-steps', type=int,
                        help="with --demos: denoising steps K (default: the model's)")
    parser.add_argument('--max-demos', type=int,
                        help='with --demos: use only the first demonstrations of the file')
    parser.add_argument('--out', required=True, help='run directory (log, best/, last/)')
    parser.add_argument('--target-sparsity', type=float, default=d.target_sparsity,
                        help='share of (step, unit) entries the pruner learns to reuse')
    parser.add_argument('--directions', action=ListAction, default=list(REUSE_DIRECTIONS),
                        check=reuse_direction,
                        help='reuse directions the pruner may choose, space or comma separated')
    parser.add_argument('--lambda-sparse', type=float, default=d.lambda_sparse,
                        help='weight of the sparsity loss')
    parser.add_argument('--fidelity', choices=FIDELITY_LOSSES, default=d.fidelity,
                        help='fidelity loss: normalized_l1 (action dims mapped to [-1, 1]) or '
                             'l1 (raw units)')
    parser.add_argument('--epochs', type=int, default=d.epochs, help='training epochs')
    parser.add_argument('--batch-episodes', type=int, default=d.batch_episodes,
                        help='episodes per batch')
    parser.add_argument('--val-episodes', type=int, default=d.val_episodes,
                        help='episodes held out for validation')
    parser.add_argument('--lr', type=float, default=d.lr, help='peak AdamW learning rate')
    parser.add_argument('--weight-decay', type=float, default=d.weight_decay,
                        help='AdamW weight decay')
    parser.add_argument('--warmup-steps', type=int, default=d.warmup_steps,
                        help='linear learning-rate warm-up steps')
    parser.add_argument('--max-minutes', type=float, default=d.max_minutes,
                        help='stop after the epoch that crosses this time (0: no limit)')
    parser.add_argument('--seed', type=int, default=d.seed,
                        help='seed of the pruner initialisation and the episode order')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto',
                        help='where the frozen policy, the pruner and the batches live '
                             '(auto: CUDA when torch sees one)')
    parser.add_argument('--rollout-max-age', type=int, default=d.rollout_max_age,
                        help='cache aging as deployed: rollout slots older than this many '
                             'control steps are recomputed (0: never)')
    parser.add_argument('--hidden-dim', type=int, default=p.hidden_dim,
                        help='pruner transformer width')
    parser.add_argument('--n-head', type=int, default=p.n_head, help='pruner attention heads')
    parser.add_argument('--dim-feedforward', type=int, default=p.dim_feedforward,
                        help='pruner feed-forward width')
    parser.add_argument('--dropout', type=float, default=p.dropout, help='pruner dropout')
    parser.add_argument('--install', action='store_true',
                        help='save the chosen pruner into --model (pruners/<sampler>-<K>/ '
                             'when the top-level pruner serves another schedule)')
    parser.add_argument('--closed-loop-episodes', type=int, default=0,
                        help='after training, roll out best/ and last/ on this many seeds '
                             'and choose by success, then steps per successful episode '
                             '(0: choose by validation loss)')
    parser.add_argument('--closed-loop-seed-start', type=int, default=200000,
                        help='first seed of the closed-loop validation range (keep it apart '
                             'from rollout, evaluation and frontier seeds)')
    parser.add_argument('--closed-loop-workers', type=int, default=2,
                        help='simulator processes of the closed-loop validation')
    parser.add_argument('--allow-other-policy', action='store_true',
                        help='accept rollouts recorded with other weights (not recommended)')


def check_args(args: argparse.Namespace) -> None:
    """Check the values, the model and the rollouts (or demos) before training starts."""
    from sparse_policy_node.training.pruner_training import check_rollouts as same_policy
    from sparse_policy_node.training.pruner_training import resolve_device
    check_range(args.target_sparsity, '--target-sparsity', low=0.0, high=0.99,
                hint='give a fraction, e.g. 0.93')
    for option in ('epochs', 'batch_episodes'):
        check_range(getattr(args, option), f'--{option.replace("_", "-")}', low=1)
    for option in ('val_episodes', 'warmup_steps', 'frame_stride', 'rollout_max_age',
                   'closed_loop_episodes', 'max_minutes'):
        check_range(getattr(args, option), f'--{option.replace("_", "-")}', low=0)
    check_range(args.dropout, '--dropout', low=0.0, high=1.0)
    check_range(args.demo_steps, '--demo-steps', low=1)
    resolve_device(args.device)
    check_model_dir(args.model, pruners=True)
    if args.demos:
        check_file(args.demos, '--demos', 'pass a robomimic-layout HDF5 file (sparse-policy '
                   'demos or dataset-from-bag writes one)')
    else:
        attrs = check_rollouts(args.rollouts)
        try:
            same_policy(attrs, args.model, args.allow_other_policy)
        except ValueError as exc:
            message = str(exc).replace('(or pass allow_other_policy)',
                                       '(or pass --allow-other-policy)')
            raise CommandError(message) from exc


def run(args: argparse.Namespace) -> int:
    """Train as the arguments say; print a one-line summary."""
    check_args(args)
    cfg = PrunerTrainConfig(
        target_sparsity=args.target_sparsity, directions=tuple(args.directions),
        lambda_sparse=args.lambda_sparse, fidelity=args.fidelity, epochs=args.epochs,
        batch_episodes=args.batch_episodes, val_episodes=args.val_episodes, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        max_minutes=args.max_minutes, seed=args.seed, threads=args.threads,
        rollout_max_age=args.rollout_max_age, device=args.device,
        pruner=PrunerConfig(hidden_dim=args.hidden_dim, n_head=args.n_head,
                            dim_feedforward=args.dim_feedforward, dropout=args.dropout))
    rollouts = args.rollouts
    if args.demos:
        from sparse_policy_node.training.demo_targets import demos_to_rollouts
        os.makedirs(args.out, exist_ok=True)
        rollouts = os.path.join(args.out, 'demo_targets.hdf5')
        try:
            demos_to_rollouts(args.model, args.demos, rollouts, sampler=args.demo_sampler,
                              steps=args.demo_steps, frame_stride=args.frame_stride or None,
                              seed=args.seed, max_demos=args.max_demos)
        except (ValueError, KeyError, OSError) as exc:
            raise SystemExit(f'train-pruner: {exc}') from exc
    closed_loop = args.closed_loop_episodes > 0
    summary = train_pruner(args.model, rollouts, args.out, cfg,
                           install=args.install and not closed_loop,
                           allow_other_policy=args.allow_other_policy)
    best = summary['best']
    keys = ('val_fidelity', 'val_sparsity_executed', 'train_fidelity', 'train_sparsity')
    line = {'best_epoch': summary['best_epoch'], 'minutes': round(summary['minutes'], 1),
            **{k: round(best[k], 4) for k in keys if k in best}}
    if closed_loop:
        from sparse_policy_node.training.pruner_selection import select_closed_loop
        seeds = list(range(args.closed_loop_seed_start,
                           args.closed_loop_seed_start + args.closed_loop_episodes))
        selection = select_closed_loop(args.model, args.out, seeds, args.rollout_max_age,
                                       args.closed_loop_workers)
        line['closed_loop'] = selection
        if args.install:
            summary['installed'] = install_pruner(
                os.path.join(args.out, selection['chosen']), args.model)
    line['installed'] = summary.get('installed')
    print(json.dumps(line))
    return 0
