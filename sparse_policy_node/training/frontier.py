"""``sparse-policy frontier``: the speed/success frontier of a model, and its serving default.

Points of one run (every point sees the same seeds; per seed, every point runs its episode
in the same worker one after another, so their chunk latencies are measured side by side
under the same machine load):

- ``dense``: the model's own sampler and K (DDPM-100 for the shipped models);
- ``ddim-K`` for each ``--ddim-steps`` K (dense, fewer steps);
- for every schedule that has a pruner (``pruners/``): learned gates as trained
  (``sparse@<schedule>``) and the dial at each ``--dials`` sparsity (``dial-P@<schedule>``;
  ``--schedule-dials ddpm-100=0.9,0.93`` sets them per schedule), with the cache max age each
  pruner was trained with (``--rollout-max-age`` overrides it);
- ``--extra-points``: any other ``eval`` variants.

Per point: success, steps per successful episode, action deviation from the dense reference
(see :mod:`evaluate`), mean chunk latency, realized sparsity. A point is on the Pareto
frontier when no other point is at least as successful and at least as fast, and strictly
better in one. A point is *lossless* when its success is within ``--tolerance-episodes`` of
dense and its successful episodes are at most ``--max-steps-ratio`` times as long as dense's;
``--install`` writes the fastest lossless point into the model directory as its serving
default (``serving.json``), which the policy node, ``eval --variants default`` and ``bench``
use when nothing else is given.

Output in ``--out``: ``frontier.json`` (every point and episode), ``frontier.png`` (success
and steps per successful episode against chunk latency, frontier marked), ``frontier.md`` (the
table in Markdown) and a printed table.
"""

import argparse
import json
import os
import sys
from typing import Dict
from typing import List
from typing import Optional
from typing import Sequence

import numpy as np
from sparse_policy_node.tools.args import add_episode_arguments
from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_episode_arguments
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import check_task
from sparse_policy_node.tools.args import CommandError
from sparse_policy_node.tools.args import ListAction
from sparse_policy_node.training.parallel import episode_results
from tqdm import tqdm

_WORKER = {}


def frontier_points(model_dir: str, ddim_steps: List[int], dials: List[float],
                    include_sparse: bool = True,
                    schedule_dials: Optional[Dict[str, List[float]]] = None,
                    extra: Sequence[str] = ()) -> List[str]:
    """Return the variant names of the frontier of ``model_dir`` (see the module docstring).

    Args:
        schedule_dials: ``{'<sampler>-<K>': [sparsity, ...]}`` replacing ``dials`` for that
            schedule.
        extra: further variant names, appended.
    """
    from sparse_policy_node.core.checkpoint import pruner_dirs
    from sparse_policy_node.core.checkpoint import schedule_name
    points = ['dense'] + [f'ddim-{k}' for k in ddim_steps]
    for schedule in sorted(s for s in pruner_dirs(model_dir) if s is not None):
        name = schedule_name(*schedule)
        if include_sparse:
            points.append(f'sparse@{name}')
        for p in (schedule_dials or {}).get(name, dials):
            points.append(f'dial-{100 * p:g}@{name}')
    points += [p for p in extra if p not in points]
    return points


def parse_schedule_dials(items: Sequence[str]) -> Dict[str, List[float]]:
    """Parse ``['ddpm-100=0.9,0.93', ...]`` into ``{'ddpm-100': [0.9, 0.93]}``."""
    out = {}
    for item in items:
        name, sep, values = item.partition('=')
        try:
            out[name] = [float(v) for v in values.split(',') if v] if sep else None
        except ValueError:
            out[name] = None
        if not sep or out[name] is None or not all(0 <= v <= 0.99 for v in out[name]):
            raise ValueError(f'--schedule-dials takes SAMPLER-K=P,P,... with fractions in '
                             f'[0, 0.99], got {item!r}')
    return out


def _init_worker(model_dir, task, max_steps, points, options, threads):
    from sparse_policy_node.training.evaluate import init_episode_worker
    from sparse_policy_node.training.variants import make_probed
    init_episode_worker(_WORKER, model_dir, task, max_steps, threads, lambda policy: policy)
    policy = _WORKER['policy']
    opts = dict(options, model=model_dir)
    _WORKER['points'] = {name: make_probed(policy, name, opts) for name in points}


def _close_local() -> None:
    _WORKER['env'].close()
    for variant in _WORKER['points'].values():
        if hasattr(variant, 'close'):
            variant.close()


def _episodes(seed: int) -> Dict[str, dict]:
    from sparse_policy_node.training.evaluate import run_episode
    out = {}
    for name, variant in _WORKER['points'].items():
        out[name] = run_episode(_WORKER['env'], variant, seed, _WORKER['n_obs_steps'])
    return out


def run_points(model_dir: str, points: List[str], seeds: List[int], task: str,
               options: dict, max_steps: Optional[int] = None, workers: int = 1,
               threads: int = 1, progress: bool = True) -> Dict[str, List[dict]]:
    """Run every point on every seed, interleaved per seed; per-point episode results."""
    init = (model_dir, task, max_steps, points, options, threads)
    results: Dict[str, List[dict]] = {name: [] for name in points}
    bar = tqdm(total=len(seeds), desc=f'frontier ({len(points)} points)', unit='seed',
               disable=not progress, file=sys.stderr)
    with episode_results(_episodes, seeds, workers, _init_worker, init,
                         close_local=_close_local) as episodes:
        for per_point in episodes:
            for name, result in per_point.items():
                results[name].append(result)
            bar.update(1)
            bar.set_postfix(dense=sum(r['success'] for r in results['dense']))
    bar.close()
    return results


def pareto(points: List[dict]) -> List[str]:
    """Names of the points no other point dominates in (success up, chunk latency down)."""
    front = []
    for p in points:
        dominated = any(q['success'] >= p['success'] and q['chunk_ms'] <= p['chunk_ms']
                        and (q['success'] > p['success'] or q['chunk_ms'] < p['chunk_ms'])
                        for q in points)
        if not dominated:
            front.append(p['name'])
    return front


def is_lossless(point: dict, dense: dict, episodes: int, tolerance_episodes: int,
                max_steps_ratio: float) -> bool:
    """Success within ``tolerance_episodes`` of dense and successful episodes not too long."""
    if point['success'] < dense['success'] - tolerance_episodes / episodes - 1e-9:
        return False
    if point['steps_success'] is None or dense['steps_success'] is None:
        return point['steps_success'] is None and dense['steps_success'] is None
    return point['steps_success'] <= max_steps_ratio * dense['steps_success']


DEPLOYMENT_FIELDS = ('backend', 'precision', 'cuda_graphs')


def point_runtime(name: str, model_dir: str, rollout_max_age: Optional[int]) -> dict:
    """Return the RuntimeConfig fields that serve point ``name``.

    ``rollout_max_age`` None: the max age the schedule's pruner was trained with. The
    deployment's fields (:data:`DEPLOYMENT_FIELDS`: backend, precision, CUDA graphs) are left
    out: they are the serving machine's choice, not the model's.
    """
    from dataclasses import asdict
    from sparse_policy_node.training.variants import variant_runtime
    runtime = variant_runtime(name, model_dir, {'rollout_max_age': rollout_max_age})
    return {k: v for k, v in asdict(runtime).items() if k not in DEPLOYMENT_FIELDS}


def summarize_points(results: Dict[str, List[dict]], args) -> dict:
    """Per-point metrics, the frontier and the chosen serving point."""
    n = len(args.seeds)
    rows = []
    for name, episodes in results.items():
        wins = [r['steps'] for r in episodes if r['success']]
        row = {'name': name, 'success': float(np.mean([r['success'] for r in episodes])),
               'wins': len(wins), 'episodes': len(episodes),
               'steps_success': float(np.mean(wins)) if wins else None,
               'chunk_ms': float(np.mean([r['chunk_ms'] for r in episodes]))}
        for key in ('action_dev', 'realized_sparsity', 'gmacs'):
            if all(key in r for r in episodes):
                row[key] = float(np.mean([r[key] for r in episodes]))
        rows.append(row)
    dense = rows[0]
    front = pareto(rows)
    for row in rows:
        row['on_frontier'] = row['name'] in front
        row['lossless'] = is_lossless(row, dense, n, args.tolerance_episodes,
                                      args.max_steps_ratio)
    lossless = [r for r in rows if r['lossless']]
    chosen = min(lossless, key=lambda r: r['chunk_ms']) if lossless else dense
    return {'model': args.model, 'task': args.task, 'seed_start': args.seeds[0],
            'episodes': n, 'rollout_max_age': args.rollout_max_age,
            'tolerance_episodes': args.tolerance_episodes,
            'max_steps_ratio': args.max_steps_ratio, 'points': rows, 'frontier': front,
            'chosen': chosen['name'],
            'chosen_runtime': point_runtime(chosen['name'], args.model, args.rollout_max_age),
            'episodes_per_point': results}


def print_points(report: dict) -> None:
    """Print one row per point; ``*`` marks the frontier, ``L`` lossless points."""
    dense = report['points'][0]
    print(f'{report["task"]}: {report["episodes"]} seeds from {report["seed_start"]}; '
          f'lossless = within {report["tolerance_episodes"]} episode(s) of dense success and '
          f'successful episodes <= {report["max_steps_ratio"]:.2f}x as long')
    print(f'{"point":<20} {"success":>8} {"steps/succ.":>11} {"chunk ms":>9} '
          f'{"vs dense":>8} {"act. dev":>8} {"sparsity":>8}  flags')
    for r in report['points']:
        flags = ('*' if r['on_frontier'] else ' ') + ('L' if r['lossless'] else ' ')
        if r['name'] == report['chosen']:
            flags += '  <- serving default'
        steps = r['steps_success'] if r['steps_success'] is not None else float('nan')
        print(f'{r["name"]:<20} {r["wins"]:>4}/{r["episodes"]:<3} {steps:>11.1f} '
              f'{r["chunk_ms"]:>9.1f} {r["chunk_ms"] / dense["chunk_ms"]:>8.2f} '
              f'{r.get("action_dev", float("nan")):>8.4f} '
              f'{r.get("realized_sparsity", 0.0):>8.3f}  {flags}')


def markdown_table(report: dict) -> str:
    """Return the points as a Markdown table (README-ready); bold: the serving default."""
    dense = report['points'][0]
    lines = ['| point | success | steps per successful episode | chunk ms | vs dense | '
             'action dev. | realized sparsity | frontier | lossless |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in report['points']:
        name = f'**{r["name"]}**' if r['name'] == report['chosen'] else r['name']
        steps = f'{r["steps_success"]:.1f}' if r['steps_success'] is not None else '-'
        lines.append(
            f'| {name} | {r["wins"]}/{r["episodes"]} | {steps} | {r["chunk_ms"]:.1f} | '
            f'{r["chunk_ms"] / dense["chunk_ms"]:.2f} | {r.get("action_dev", float("nan")):.4f}'
            f' | {r.get("realized_sparsity", 0.0):.3f} | {"yes" if r["on_frontier"] else ""} '
            f'| {"yes" if r["lossless"] else ""} |')
    return '\n'.join(lines)


def plot_frontier(report: dict, path: str) -> None:
    """Success and steps per successful episode against chunk latency; frontier marked."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    rows = report['points']
    fig, (ax_s, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        kind = r['name'].split('@')[0].split('-')[0]
        marker = {'dense': 'D', 'ddim': 's', 'sparse': '^', 'dial': 'o'}.get(kind, 'o')
        colour = 'tab:red' if r['name'] == report['chosen'] else (
            'tab:blue' if r['on_frontier'] else 'tab:gray')
        ax_s.scatter(r['chunk_ms'], r['success'], marker=marker, color=colour, zorder=3)
        ax_s.annotate(r['name'], (r['chunk_ms'], r['success']), fontsize=7, xytext=(3, 3),
                      textcoords='offset points')
        if r['steps_success'] is not None:
            ax_l.scatter(r['chunk_ms'], r['steps_success'], marker=marker, color=colour,
                         zorder=3)
            ax_l.annotate(r['name'], (r['chunk_ms'], r['steps_success']), fontsize=7,
                          xytext=(3, 3), textcoords='offset points')
    front = sorted((r for r in rows if r['on_frontier']), key=lambda r: r['chunk_ms'])
    ax_s.step([r['chunk_ms'] for r in front], [r['success'] for r in front], where='post',
              color='tab:blue', alpha=0.6, label='Pareto frontier')
    dense = rows[0]
    floor = dense['success'] - report['tolerance_episodes'] / report['episodes']
    ax_s.axhline(floor, color='tab:green', ls=':', label='lossless floor')
    if dense['steps_success'] is not None:
        ax_l.axhline(report['max_steps_ratio'] * dense['steps_success'], color='tab:green',
                     ls=':', label=f'{report["max_steps_ratio"]:.2f}x dense')
    ax_s.set_ylabel('success rate')
    ax_l.set_ylabel('steps per successful episode')
    for ax in (ax_s, ax_l):
        ax.set_xlabel('mean chunk latency (ms, batch 1, measured side by side)')
        ax.set_xscale('log')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f'{report["task"]}: {report["episodes"]} seeds from {report["seed_start"]} '
                 f'(red: serving default; blue: frontier)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def install(report: dict, model_dir: str) -> str:
    """Write the chosen point as the model's serving default; return the path."""
    from sparse_policy_node.core.checkpoint import write_serving_config
    chosen = next(r for r in report['points'] if r['name'] == report['chosen'])
    dense = report['points'][0]
    provenance = {'command': 'sparse-policy frontier', 'point': report['chosen'],
                  'episodes': report['episodes'], 'seed_start': report['seed_start'],
                  'success': chosen['success'], 'steps_success': chosen['steps_success'],
                  'chunk_ms': chosen['chunk_ms'], 'dense_success': dense['success'],
                  'dense_steps_success': dense['steps_success'],
                  'dense_chunk_ms': dense['chunk_ms']}
    return write_serving_config(model_dir, report['chosen_runtime'], provenance)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    add_model_argument(parser, default='models/lift')
    parser.add_argument('--episodes', type=int, default=50,
                        help='episodes per point (seeds --seed-start onwards)')
    parser.add_argument('--seed-start', type=int, default=300000,
                        help='first reset seed; keep it apart from training, rollout and '
                             'validation seeds')
    add_episode_arguments(parser, schedule=False)
    parser.add_argument('--ddim-steps', action=ListAction, nargs='*', check=int,
                        default=[5, 10, 16],
                        help='K of the dense DDIM points, space or comma separated')
    parser.add_argument('--dials', action=ListAction, nargs='*', check=float,
                        default=[0.5, 0.6, 0.7],
                        help='dial sparsities of the learned-gate points (fractions), space or '
                             'comma separated')
    parser.add_argument('--schedule-dials', nargs='*', default=[],
                        help='per-schedule dials replacing --dials, e.g. ddpm-100=0.9,0.93')
    parser.add_argument('--extra-points', action=ListAction, nargs='*', default=[],
                        help='further eval variants to place on the frontier, space or comma '
                             'separated')
    parser.add_argument('--no-sparse', action='store_true',
                        help='skip the learned gates as trained (argmax) points')
    parser.add_argument('--rollout-max-age', type=int, default=None,
                        help='cache aging of the learned-gate points (0: never; default: '
                             "each schedule's pruner's trained max age)")
    parser.add_argument('--tolerance-episodes', type=int, default=1,
                        help='lossless: success at most this many episodes below dense')
    parser.add_argument('--max-steps-ratio', type=float, default=1.10,
                        help='lossless: steps per successful episode at most this x dense')
    parser.add_argument('--no-deviation', action='store_true',
                        help='skip the dense reference per chunk (no action deviation)')
    parser.add_argument('--out', help='report directory (frontier.json, frontier.png)')
    parser.add_argument('--install', action='store_true',
                        help="write the fastest lossless point as the model's serving "
                             'default (serving.json)')
    parser.add_argument('--json', action='store_true', help='print one JSON object')


def check_args(args: argparse.Namespace) -> List[str]:
    """Check the values, the model, the task and every point up front; return the points."""
    from sparse_policy_node.training.evaluate import model_task
    from sparse_policy_node.training.variants import check_variant
    from sparse_policy_node.training.variants import check_variants
    for p in args.dials:
        check_range(p, '--dials', low=0.0, high=0.99, hint='give fractions, e.g. 0.5 0.6')
    for k in args.ddim_steps:
        check_range(k, '--ddim-steps', low=1)
    check_range(args.episodes, '--episodes', low=1)
    check_episode_arguments(args)
    check_range(args.rollout_max_age, '--rollout-max-age', low=0, hint='0 never expires')
    try:
        schedule_dials = parse_schedule_dials(args.schedule_dials)
        for name in args.extra_points:
            check_variant(name)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    check_model_dir(args.model, pruners=True)
    check_task(args.task or model_task(args.model))
    points = frontier_points(args.model, args.ddim_steps, args.dials, not args.no_sparse,
                             schedule_dials, args.extra_points)
    check_variants(args.model, points, {'rollout_max_age': args.rollout_max_age})
    return points


def run(args: argparse.Namespace) -> int:
    """Measure the frontier as the arguments say."""
    from sparse_policy_node.training.evaluate import model_task
    points = check_args(args)
    args.task = args.task or model_task(args.model)
    args.seeds = list(range(args.seed_start, args.seed_start + args.episodes))
    options = {'rollout_max_age': args.rollout_max_age, 'no_deviation': args.no_deviation}
    results = run_points(args.model, points, args.seeds, args.task, options, args.max_steps,
                         args.workers, args.threads)
    report = summarize_points(results, args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'frontier.json'), 'w') as f:
            json.dump(report, f, indent=2)
        plot_frontier(report, os.path.join(args.out, 'frontier.png'))
        with open(os.path.join(args.out, 'frontier.md'), 'w') as f:
            f.write(markdown_table(report) + '\n')
    if args.install:
        report['installed'] = install(report, args.model)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != 'episodes_per_point'}))
    else:
        print_points(report)
        if args.out:
            print(f'report -> {os.path.join(args.out, "frontier.json")}')
        if args.install:
            print(f'serving default {report["chosen"]} -> {report["installed"]}')
    return 0
