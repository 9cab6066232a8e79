"""``sparse-policy train-efficiency``: success at matched sparsity against training data.

The paper's training-efficiency result: at 93% sparsity a pruner trained from two
trajectories already matches dense, and more trajectories help. This command measures it on
a model and a rollout file (``sparse-policy rollouts``):

1. for every number of trajectories n in ``--trajectories`` and every training seed in
   ``--train-seeds``: draw n episodes of the rollout file (a seeded draw without
   replacement), train a pruner on them alone (``train-pruner``'s recipe, no validation
   episodes, the last epoch kept) for ``--epochs`` epochs, or, with ``--train-frames F``,
   for as many epochs as bring its training frames nearest to F (at least one), so that every
   point gets about the same training compute whatever its n (``epochs_for_budget``);
2. roll it out in the simulator at the matched sparsity (the dial ``dial-P`` on the pruner's
   schedule, ``P = --target-sparsity``, so every point reuses exactly the same share and only
   the pruner's ranking differs) on the evaluation seeds;
3. roll out the dense policy (the rollout file's schedule) on the same seeds once.

Output in ``--out``: ``efficiency.json`` (rewritten after every point, so an interrupted run
keeps what it measured; ``--resume`` picks it up, and evaluates without retraining a point
whose training finished before the cut), ``efficiency.png`` (success and steps per successful
episode against n, one dot per training seed, the mean and dense) and one run directory per
point. Each point records the training loss terms of the epoch it evaluates
(``train_fidelity``, ``train_sparsity``: the last epoch's).

``--join A B --out C`` trains nothing: it joins the reports of runs with the same settings and
the same dense episodes (for instance one process per training seed, side by side on two
cores) into one report and plot in C.
"""

import argparse
from dataclasses import asdict
import json
import os
import random
import sys
from typing import List
from typing import Optional

import numpy as np
from sparse_policy_node.core.config import MATCHED_SPARSITY
from sparse_policy_node.tools.args import add_episode_arguments
from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_episode_arguments
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import check_rollouts
from sparse_policy_node.tools.args import CommandError
from sparse_policy_node.tools.args import ListAction


def draw_episodes(total: int, n: int, seed: int) -> List[int]:
    """Draw ``n`` of ``total`` episode indices without replacement (seeded); sorted."""
    return sorted(random.Random(seed).sample(range(total), n))


def epochs_for_budget(frames: int, budget: int) -> int:
    """Epochs over ``frames`` training frames nearest to ``budget`` frames in all (>= 1)."""
    return max(1, round(budget / frames))


def episode_summary(episodes: List[dict]) -> dict:
    """Success, steps per successful episode and realized sparsity of evaluated episodes."""
    wins = [e['steps'] for e in episodes if e['success']]
    out = {'success': float(np.mean([e['success'] for e in episodes])),
           'wins': len(wins), 'episodes': len(episodes),
           'steps_success': float(np.mean(wins)) if wins else None}
    if all('realized_sparsity' in e for e in episodes):
        out['realized_sparsity'] = float(np.mean([e['realized_sparsity'] for e in episodes]))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    add_model_argument(parser, default='models/lift')
    parser.add_argument('--rollouts',
                        help='rollout file of this model (sparse-policy rollouts); it sets '
                             'the schedule the pruners are trained for (required unless --join)')
    parser.add_argument('--trajectories', action=ListAction, check=int,
                        default=[1, 2, 4, 8, 16, 32, 64],
                        help='numbers of training trajectories, space or comma separated')
    parser.add_argument('--train-seeds', action=ListAction, check=int, default=[0],
                        help='training seeds per point (the draw of trajectories and the '
                             'pruner initialisation)')
    parser.add_argument('--epochs', type=int, default=5, help='training epochs per pruner')
    parser.add_argument('--train-frames', type=int, default=0,
                        help='training frames per pruner (control steps seen, summed over '
                             'epochs): each point trains for the epochs nearest to it, so '
                             'that every n gets the same compute; 0: --epochs for every n')
    parser.add_argument('--max-minutes', type=float, default=0.0,
                        help='stop each training after the epoch crossing this time (0: none)')
    parser.add_argument('--target-sparsity', type=float, default=MATCHED_SPARSITY,
                        help='training target and the evaluated dial')
    parser.add_argument('--batch-episodes', type=int, default=8, help='episodes per batch')
    parser.add_argument('--rollout-max-age', type=int, default=0,
                        help='cache aging in training and evaluation (0: never)')
    parser.add_argument('--episodes', type=int, default=20, help='evaluation episodes per point')
    parser.add_argument('--seed-start', type=int, default=100000,
                        help='first evaluation seed; keep it apart from the rollout seeds')
    add_episode_arguments(parser, task=False, schedule=False)
    parser.add_argument('--out', default='runs/efficiency',
                        help='report directory (efficiency.json, efficiency.png, runs)')
    parser.add_argument('--join', nargs='+', metavar='DIR', default=None,
                        help='train nothing: join the reports of runs with the same settings '
                             'and dense episodes (e.g. one process per --train-seeds value) '
                             'into --out (efficiency.json, efficiency.png)')
    parser.add_argument('--resume', action='store_true',
                        help="keep the dense episodes and finished points of --out's report "
                             '(same settings only), and the pruners whose training finished')


def check_args(args: argparse.Namespace) -> int:
    """Check the values, the model and the rollouts; return the rollout file's episodes."""
    from sparse_policy_node.training.pruner_training import check_rollouts as same_policy
    from sparse_policy_node.training.rollouts import count_rollouts
    if not args.rollouts:
        raise CommandError('--rollouts is required (a rollout file of sparse-policy rollouts), '
                           'unless --join')
    for option in ('epochs', 'batch_episodes', 'episodes'):
        check_range(getattr(args, option), f'--{option.replace("_", "-")}', low=1)
    check_episode_arguments(args)
    check_range(args.max_minutes, '--max-minutes', low=0)
    check_range(args.train_frames, '--train-frames', low=0)
    check_range(args.rollout_max_age, '--rollout-max-age', low=0)
    check_range(args.target_sparsity, '--target-sparsity', low=0.0, high=0.99,
                hint='give a fraction, e.g. 0.93')
    for n in args.trajectories:
        check_range(n, '--trajectories', low=1)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CommandError(f'--out {args.out!r} is a file; give a directory')
    check_model_dir(args.model)
    attrs = check_rollouts(args.rollouts)
    try:
        same_policy(attrs, args.model)
    except ValueError as exc:
        raise CommandError(str(exc).replace(' (or pass allow_other_policy)', '')) from exc
    total = count_rollouts(args.rollouts)
    if max(args.trajectories) > total:
        raise CommandError(f'--trajectories asks for {max(args.trajectories)} but '
                           f'{args.rollouts!r} holds {total} episodes; record more with '
                           f'sparse-policy rollouts --num')
    return total


def plot_efficiency(report: dict, path: str) -> None:
    """Success and steps per successful episode against the number of trajectories."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    fig, (ax_s, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    points = report['points']
    ns = sorted({p['trajectories'] for p in points})
    for ax, key in ((ax_s, 'success'), (ax_l, 'steps_success')):
        # Log axis and limits first: a panel may have no point at all (no successes).
        ax.set_xscale('log', base=2)
        ax.set_xlim(min(ns) / 1.5, max(ns) * 1.5)
        for p in points:
            if p[key] is not None:
                ax.scatter(p['trajectories'], p[key], color='tab:blue', alpha=0.5, s=14)
        means = [np.mean([p[key] for p in points if p['trajectories'] == n
                          and p[key] is not None] or [np.nan]) for n in ns]
        ax.plot(ns, means, color='tab:blue',
                label=f'dial {report["target_sparsity"]:g}, mean over training seeds')
        dense = report.get('dense', {}).get(key)
        if dense is not None:
            ax.axhline(dense, color='tab:red', ls='--', label='dense')
        ax.set_xlabel('training trajectories')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_s.set_ylabel('success rate')
    ax_s.set_ylim(-0.05, 1.05)
    ax_l.set_ylabel('steps per successful episode')
    budget = (f'about {report["train_frames"]} training frames per pruner'
              if report.get('train_frames') else f'{report["epochs"]} epochs per pruner')
    fig.suptitle(f'{report["task"]}, {report["schedule"]}: {report["episodes"]} episodes '
                 f'from seed {report["seed_start"]}, {budget}')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Settings added after reports were first written, with the value older reports ran with.
SETTINGS_ADDED_LATER = {'train_frames': 0}


def differing_settings(a: dict, b: dict) -> List[str]:
    """Return the settings (every key but ``points`` and ``dense``) two reports differ on.

    A setting a report lacks counts as the value it ran with (``SETTINGS_ADDED_LATER``).
    """
    a, b = {**SETTINGS_ADDED_LATER, **a}, {**SETTINGS_ADDED_LATER, **b}
    return sorted(k for k in set(a) | set(b)
                  if k not in ('points', 'dense') and a.get(k) != b.get(k))


def resumed(report: dict, out: str) -> dict:
    """Return the report in ``out`` when it was made with the same settings, else ``report``.

    Its dense episodes and finished points are kept (``--resume``). A setting an older report
    lacks counts as the value it ran with (``SETTINGS_ADDED_LATER``).
    """
    path = os.path.join(out, 'efficiency.json')
    if not os.path.isfile(path):
        return report
    with open(path) as f:
        old = {**SETTINGS_ADDED_LATER, **json.load(f)}
    differ = differing_settings(report, old)
    if differ:
        raise CommandError(f'{path} was made with other settings ({", ".join(differ)}); give '
                           f'another --out or drop --resume')
    return old


def finished_training(run_dir: str, cfg, rollouts: str) -> Optional[dict]:
    """Return the summary of a pruner training that finished in ``run_dir``, else None.

    Finished: ``run.json`` records the same training config and rollout file, ``log.jsonl``
    reaches the last epoch, and ``last/`` holds the pruner. ``--resume`` then evaluates that
    pruner instead of training it again (a run cut off during a point's evaluation).
    ``cfg``: the ``PrunerTrainConfig`` the point would train with.
    """
    from sparse_policy_node.training.pruner_training import read_log
    try:
        with open(os.path.join(run_dir, 'run.json')) as f:
            meta = json.load(f)
        rows = read_log(run_dir)
    except (OSError, ValueError):
        return None
    same = (meta.get('train_config') == json.loads(json.dumps(asdict(cfg)))
            and meta.get('rollouts') == os.path.abspath(rollouts))
    if not (same and rows and rows[-1].get('epoch') == cfg.epochs - 1
            and os.path.isfile(os.path.join(run_dir, 'last', 'pruner.safetensors'))):
        return None
    return {'minutes': rows[-1]['minutes'], 'last': rows[-1]}


# Per-episode fields that must agree for two reports' dense episodes to be the same ones.
EPISODE_KEYS = ('seed', 'success', 'steps')


def join_reports(reports: List[dict], names: List[str]) -> dict:
    """Join efficiency reports of the same settings and dense episodes into one.

    Each report's points are kept (sorted by trajectories, then training seed); the dense
    episodes must be the same episode by episode (``EPISODE_KEYS``), a point may appear once.
    Raises CommandError naming the report and what differs.
    """
    for report, name in zip(reports, names):
        if 'dense' not in report:
            raise CommandError(f'{name} has no dense episodes yet')
    first = reports[0]
    for report, name in zip(reports[1:], names[1:]):
        differ = differing_settings(first, report)
        if differ:
            raise CommandError(f'{name} was made with other settings than {names[0]} '
                               f'({", ".join(differ)})')
        ours, theirs = (
            [tuple(e[k] for k in EPISODE_KEYS) for e in r['dense']['per_episode']]
            for r in (first, report))
        if ours != theirs:
            raise CommandError(f'the dense episodes of {name} differ from those of {names[0]}')
    points, seen = [], set()
    for report, name in zip(reports, names):
        for point in report['points']:
            key = (point['trajectories'], point['train_seed'])
            if key in seen:
                raise CommandError(f'{name} repeats the point n={key[0]}, seed {key[1]}')
            seen.add(key)
            points.append(point)
    points.sort(key=lambda p: (p['trajectories'], p['train_seed']))
    return dict(first, points=points)


def run_join(args: argparse.Namespace) -> int:
    """``--join``: write the joined report and its plot to ``--out``."""
    reports = []
    for run_dir in args.join:
        path = os.path.join(run_dir, 'efficiency.json')
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as exc:
            raise CommandError(f'--join: cannot read {path} ({exc})') from exc
    report = join_reports(reports, args.join)
    os.makedirs(args.out, exist_ok=True)
    _save(report, args.out)
    print(f'{len(report["points"])} points from {len(reports)} reports -> '
          f'{os.path.join(args.out, "efficiency.json")}')
    return 0


def _save(report: dict, out: str) -> None:
    with open(os.path.join(out, 'efficiency.json'), 'w') as f:
        json.dump(report, f, indent=1)
    if report['points']:
        plot_efficiency(report, os.path.join(out, 'efficiency.png'))


def run(args: argparse.Namespace) -> int:
    """Train and evaluate every point; write the report as it grows."""
    from sparse_policy_node.core.checkpoint import schedule_name
    from sparse_policy_node.training.evaluate import evaluate_variant
    from sparse_policy_node.training.evaluate import model_task
    from sparse_policy_node.training.pruner_selection import candidate_model
    from sparse_policy_node.training.pruner_training import PrunerTrainConfig
    from sparse_policy_node.training.pruner_training import train_pruner
    from sparse_policy_node.training.rollouts import read_rollout_attrs
    from sparse_policy_node.training.rollouts import rollout_lengths
    if args.join:
        return run_join(args)
    total = check_args(args)
    lengths = rollout_lengths(args.rollouts)
    attrs = read_rollout_attrs(args.rollouts)
    schedule = schedule_name(str(attrs['sampler']), int(attrs['num_inference_steps']))
    task = model_task(args.model)
    seeds = list(range(args.seed_start, args.seed_start + args.episodes))
    options = {'rollout_max_age': args.rollout_max_age, 'no_deviation': True}
    os.makedirs(args.out, exist_ok=True)
    report = {'model': args.model, 'task': task, 'rollouts': args.rollouts,
              'rollout_episodes': total, 'schedule': schedule,
              'target_sparsity': args.target_sparsity, 'epochs': args.epochs,
              'train_frames': args.train_frames,
              'rollout_max_age': args.rollout_max_age, 'max_steps': args.max_steps,
              'seed_start': args.seed_start, 'episodes': args.episodes, 'points': []}
    report = resumed(report, args.out) if args.resume else report
    if 'dense' not in report:
        dense = evaluate_variant(args.model, seeds, task, f'dense@{schedule}', options,
                                 args.max_steps, args.workers, args.threads)
        report['dense'] = dict(episode_summary(dense), per_episode=dense)
        _save(report, args.out)
    dial = f'dial-{100 * args.target_sparsity:g}@{schedule}'
    done = {(p['trajectories'], p['train_seed']) for p in report['points']}
    for n in args.trajectories:
        for seed in args.train_seeds:
            if (n, seed) in done:
                continue
            run_dir = os.path.join(args.out, f'n{n}_seed{seed}')
            indices = draw_episodes(total, n, seed)
            frames = sum(lengths[i] for i in indices)
            epochs = (epochs_for_budget(frames, args.train_frames) if args.train_frames
                      else args.epochs)
            cfg = PrunerTrainConfig(target_sparsity=args.target_sparsity, epochs=epochs,
                                    batch_episodes=min(args.batch_episodes, n), val_episodes=0,
                                    max_minutes=args.max_minutes, seed=seed,
                                    threads=args.threads, rollout_max_age=args.rollout_max_age)
            summary = args.resume and finished_training(run_dir, cfg, args.rollouts)
            if summary:
                print(f'n={n} seed={seed}: training finished in {run_dir}, evaluating it',
                      file=sys.stderr)
            else:
                summary = train_pruner(args.model, args.rollouts, run_dir, cfg,
                                       episode_indices=indices)
            model = candidate_model(args.model, os.path.join(run_dir, 'last'),
                                    os.path.join(run_dir, 'model'))
            episodes = evaluate_variant(model, seeds, task, dial, options, args.max_steps,
                                        args.workers, args.threads)
            report['points'].append(dict(
                episode_summary(episodes), trajectories=n, train_seed=seed,
                train_episodes=indices, train_frames=frames * epochs, epochs=epochs,
                train_minutes=round(summary['minutes'], 2),
                train_sparsity=summary['last'].get('train_sparsity'),
                train_fidelity=summary['last'].get('train_fidelity'), per_episode=episodes))
            _save(report, args.out)
            point = report['points'][-1]
            print(f'n={n} seed={seed}: {point["wins"]}/{point["episodes"]} at {dial} '
                  f'(dense {report["dense"]["wins"]}/{args.episodes})', file=sys.stderr)
    print(json.dumps({'dense': report['dense']['success'],
                      'points': [{k: p[k] for k in ('trajectories', 'train_seed', 'success',
                                                    'steps_success')}
                                 for p in report['points']]}))
    print(f'report -> {os.path.join(args.out, "efficiency.json")}')
    return 0
