"""``sparse-policy eval``: success rate of a model over a seed range in the simulator.

Every variant (the names and where each is built: :mod:`variants`) is a policy-like object
with ``reset()`` and ``predict_action(obs) -> {'action': (1, n, A)}``. An object that also has
``episode_stats()`` adds its per-episode statistics (realized sparsity, MACs) to the results.
Each episode resets the simulator and torch's global generator with the episode seed, so
variants see identical initial states and initial noise. Results: a printed table,
``report.json``, ``success.png`` and ``tradeoff.png`` (success against sparsity and chunk
latency) in ``--out``; ``--json`` prints one JSON object instead of the table.

Quality beyond success, per variant: ``steps_success`` (mean episode length of the successful
episodes: hesitant, slower motion shows here first) and ``action_dev``, the deviation of the
variant's executed actions from the dense policy's on the same observations (measured by
:class:`deviation.DeviationProbe`); ``--no-deviation`` skips it.
"""

import argparse
from collections import deque
from functools import partial
import json
import os
import sys
import time
from typing import Callable
from typing import Dict
from typing import List
from typing import Optional

import numpy as np
from sparse_policy_node.core import keys
from sparse_policy_node.core.checkpoint import load_policy
from sparse_policy_node.core.checkpoint import load_policy_config
from sparse_policy_node.core.checkpoint import read_metadata
from sparse_policy_node.core.config import MATCHED_SPARSITY
from sparse_policy_node.tools.args import add_episode_arguments
from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_episode_arguments
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import check_task
from sparse_policy_node.tools.args import ListAction
from sparse_policy_node.training.parallel import episode_results
from sparse_policy_node.training.sparse_eval import plot_tradeoff
from sparse_policy_node.training.variants import check_variant
from sparse_policy_node.training.variants import check_variants
from sparse_policy_node.training.variants import make_probed
import torch
from tqdm import tqdm


SPARSE_STAT_KEYS = ('realized_sparsity', 'episode_sparsity', 'gmacs', 'action_dev')


def _variant_arg(name: str) -> str:
    try:
        return check_variant(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    add_model_argument(parser, default='models/lift')
    parser.add_argument('--episodes', type=int, default=50,
                        help='episodes per variant (seeds --seed-start onwards)')
    parser.add_argument('--seed-start', type=int, default=100000,
                        help='first reset seed; keep it disjoint from the training seeds')
    add_episode_arguments(parser)
    parser.add_argument('--variants', action=ListAction, default=['dense'], check=_variant_arg,
                        help='space or comma separated: default (serving.json), dense, sparse '
                             '(learned gates), dial-P (P %% or a fraction < 1), omni, '
                             'only-forward, only-timestep, only-rollout, static[-P], '
                             'random[-P], ddim-K; any but default and ddim-K take a schedule '
                             'suffix @ddim-K / @ddpm-K')
    parser.add_argument('--rollout-max-age', type=int, default=None,
                        help='cache aging of the learned-gate variants (0: never expire; '
                             "default: the max age each schedule's pruner was trained with; "
                             'the default variant uses its own)')
    parser.add_argument('--no-deviation', action='store_true',
                        help='skip the dense reference per chunk (no action_dev column)')
    parser.add_argument('--ablation-sparsity', type=float, default=MATCHED_SPARSITY,
                        help='sparsity of omni / only-* / static / random without -P')
    parser.add_argument('--device', default='cpu',
                        help='torch device of the policy (cpu, cuda, cuda:N); on CUDA the '
                             'engine variants run with CUDA graphs, as the node does')
    parser.add_argument('--precision', default='float32',
                        choices=('float32', 'float16', 'bfloat16'),
                        help='denoiser precision (RuntimeConfig.precision); below float32 the '
                             'dense variant runs on the engine with sparsity off')
    parser.add_argument('--out', help='report directory (report.json, success.png)')
    parser.add_argument('--json', action='store_true', help='print one JSON object')


def check_args(args: argparse.Namespace) -> Dict[str, str]:
    """Check the values, the model, its pruners, the task and every variant up front.

    Returns:
        ``{variant: what it runs}`` (schedule and gates).
    """
    check_range(args.episodes, '--episodes', low=1)
    check_episode_arguments(args)
    check_range(args.rollout_max_age, '--rollout-max-age', low=0, hint='0 never expires')
    check_range(args.ablation_sparsity, '--ablation-sparsity', low=0.0, high=0.99)
    check_model_dir(args.model, pruners=True)
    check_task(args.task or model_task(args.model))
    return check_variants(args.model, args.variants, eval_options(args))


def eval_options(args: argparse.Namespace) -> dict:
    """Return the variant options given on the command line."""
    return {'sampler': args.sampler, 'steps': args.steps,
            'ablation_sparsity': args.ablation_sparsity,
            'rollout_max_age': args.rollout_max_age, 'no_deviation': args.no_deviation,
            'device': args.device, 'precision': args.precision}


def model_task(model_dir: str) -> str:
    """Task recorded in the model's training metadata, ``lift`` when absent."""
    return read_metadata(model_dir).get('env_args', {}).get('task', 'lift')


def obs_window(history: deque, device: str = 'cpu') -> Dict[str, torch.Tensor]:
    """Stack T_o observations into a (1, T_o, ...) batch on ``device``."""
    return {k: torch.from_numpy(np.stack([o[k] for o in history]))[None].to(device)
            for k in history[0]}


def run_episode(env, policy, seed: int, n_obs_steps: int, device: str = 'cpu') -> dict:
    """Run one closed-loop episode; return success, steps, seconds and mean chunk time."""
    torch.manual_seed(seed)
    policy.reset()
    obs = env.reset(seed)
    # Before the second step the window repeats the first frame, as in training.
    history = deque([obs] * n_obs_steps, maxlen=n_obs_steps)
    start, chunk_s, chunks = time.time(), 0.0, 0
    done, info = False, {'success': False}
    while not done:
        t0 = time.perf_counter()
        out = policy.predict_action(obs_window(history, device))
        chunk_s += out['chunk_ms'] / 1e3 if 'chunk_ms' in out else time.perf_counter() - t0
        actions = out['action'][0].cpu().numpy()
        chunks += 1
        for action in actions:
            obs, _, done, info = env.step(action)
            history.append(obs)
            if done:
                break
    return {'seed': seed, 'success': bool(info['success']), 'steps': env.steps,
            'seconds': round(time.time() - start, 2),
            'chunk_ms': round(1000 * chunk_s / max(chunks, 1), 2), 'chunks': chunks,
            **(policy.episode_stats() if hasattr(policy, 'episode_stats') else {})}


_WORKER = {}


def init_episode_worker(worker: dict, model_dir: str, task: str, max_steps: int, threads: int,
                        wrap: Callable, device: str = 'cpu') -> None:
    """Set up a process that runs episodes of ``model_dir``.

    ``worker`` gets ``env`` (the simulator for the model's cameras), ``policy``
    (``wrap(policy)``) and ``n_obs_steps`` (T_o).
    """
    from sparse_policy_node.sim.robosuite_env import make_env
    torch.set_num_threads(threads)
    policy = load_policy(model_dir, device)
    worker['device'] = device
    vision = policy.config.obs.vision
    needs_object = any(key == keys.OBJECT for key, _ in policy.config.obs.lowdim)
    worker['env'] = make_env(task, vision.cameras, vision.image_size,
                             include_object=needs_object, max_steps=max_steps)
    worker['policy'] = wrap(policy)
    worker['n_obs_steps'] = policy.config.transformer.n_obs_steps


def _init_worker(model_dir, task, max_steps, variant, options, threads):
    init_episode_worker(_WORKER, model_dir, task, max_steps, threads,
                        partial(make_probed, name=variant,
                                options=dict(options, model=model_dir)),
                        options.get('device', 'cpu'))


def _close_local() -> None:
    _WORKER['env'].close()
    if hasattr(_WORKER['policy'], 'close'):
        _WORKER['policy'].close()


def _episode(seed):
    return run_episode(_WORKER['env'], _WORKER['policy'], seed, _WORKER['n_obs_steps'],
                       _WORKER['device'])


def evaluate_variant(model_dir: str, seeds: List[int], task: str, variant: str = 'dense',
                     options: dict = None, max_steps: int = None, workers: int = 1,
                     threads: int = 1, progress: bool = True) -> List[dict]:
    """Run ``variant`` of the model on every seed; return per-episode results in seed order."""
    init = (model_dir, task, max_steps, variant, options or {}, threads)
    bar = tqdm(total=len(seeds), desc=f'eval {variant}', unit='ep', disable=not progress,
               file=sys.stderr)
    results = []
    with episode_results(_episode, seeds, workers, _init_worker, init,
                         close_local=_close_local) as episodes:
        for result in episodes:
            results.append(result)
            bar.update(1)
            bar.set_postfix(success=sum(r['success'] for r in results))
    bar.close()
    return results


def summarize(model_dir, task, seeds, options, per_variant: Dict[str, List[dict]],
              runs: Optional[Dict[str, str]] = None) -> dict:
    """Build the JSON report: ``success_<variant>`` rates plus per-episode details.

    ``sampler`` / ``num_inference_steps`` are the schedule of the variants that take the
    command line's (or the model config's); ``runs_<variant>`` says what each one ran.
    """
    config = load_policy_config(model_dir).scheduler
    report = {'model': model_dir, 'task': task, 'episodes': len(seeds), 'seed_start': seeds[0],
              'sampler': options.get('sampler') or config.sampler,
              'num_inference_steps': options.get('steps') or config.num_inference_steps,
              'device': options.get('device', 'cpu'),
              'precision': options.get('precision', 'float32')}
    for name, results in per_variant.items():
        if runs and name in runs:
            report[f'runs_{name}'] = runs[name]
        report[f'success_{name}'] = float(np.mean([r['success'] for r in results]))
        report[f'chunk_ms_{name}'] = float(np.mean([r['chunk_ms'] for r in results]))
        wins = [r['steps'] for r in results if r['success']]
        report[f'steps_success_{name}'] = float(np.mean(wins)) if wins else None
        for key in SPARSE_STAT_KEYS:
            if all(key in r for r in results):
                report[f'{key}_{name}'] = float(np.mean([r[key] for r in results]))
        report[f'episodes_{name}'] = results
    if 'sparse' in per_variant:
        # Headline numbers of the learned gates.
        report['realized_sparsity'] = report.get('realized_sparsity_sparse')
        report['episode_sparsity'] = report.get('episode_sparsity_sparse')
    return report


def print_table(report: dict, variants: List[str]) -> None:
    """Print one row per variant."""
    print(f'{report["task"]}: {report["episodes"]} episodes from seed {report["seed_start"]}')
    print(f'{"variant":<18} {"runs":<22} {"success":>9} {"rate":>6} {"chunk ms":>9} '
          f'{"steps/succ.":>11} {"action dev":>10} {"sparsity":>9} {"episode sp.":>11} '
          f'{"GMAC":>7}')
    for name in variants:
        runs = report.get(f'runs_{name}', '?')
        results = report[f'episodes_{name}']
        wins = sum(r['success'] for r in results)
        steps = report.get(f'steps_success_{name}')
        extra = ''.join(f' {report[k]:>{w}.{p}f}' if report.get(k) is not None
                        else f' {"-":>{w}}'
                        for k, w, p in ((f'action_dev_{name}', 10, 4),
                                        (f'realized_sparsity_{name}', 9, 3),
                                        (f'episode_sparsity_{name}', 11, 3),
                                        (f'gmacs_{name}', 7, 3)))
        print(f'{name:<18} {runs:<22} {f"{wins}/{len(results)}":>9} '
              f'{report[f"success_{name}"]:>6.0%} '
              f'{report[f"chunk_ms_{name}"]:>9.1f} '
              f'{steps if steps is not None else float("nan"):>11.1f}{extra}')


def plot_report(report: dict, variants: List[str], path: str) -> None:
    """Save a plot of the cumulative success rate over episodes per variant."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in variants:
        wins = np.array([r['success'] for r in report[f'episodes_{name}']], dtype=float)
        curve = np.cumsum(wins) / np.arange(1, len(wins) + 1)
        ax.plot(np.arange(1, len(wins) + 1), curve,
                label=f'{name}: {report[f"success_{name}"]:.0%}')
    ax.set_xlabel('episodes')
    ax.set_ylabel('cumulative success rate')
    ax.set_ylim(0, 1.05)
    ax.set_title(f'{report["task"]}, seeds {report["seed_start"]}+')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Evaluate as the arguments say."""
    runs = check_args(args)
    task = args.task or model_task(args.model)
    seeds = list(range(args.seed_start, args.seed_start + args.episodes))
    options = eval_options(args)
    per_variant = {name: evaluate_variant(args.model, seeds, task, name, options, args.max_steps,
                                          args.workers, args.threads)
                   for name in args.variants}
    report = summarize(args.model, task, seeds, options, per_variant, runs)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'report.json'), 'w') as f:
            json.dump(report, f, indent=2)
        plot_report(report, args.variants, os.path.join(args.out, 'success.png'))
        plot_tradeoff(report, args.variants, os.path.join(args.out, 'tradeoff.png'))
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report, args.variants)
        if args.out:
            print(f'report -> {os.path.join(args.out, "report.json")}')
    return 0
