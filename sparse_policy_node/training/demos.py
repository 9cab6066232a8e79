"""``sparse-policy demos``: collect scripted demonstrations into a robomimic-layout HDF5 file.

Seeds are tried in order from ``--seed-start``; failed episodes are dropped and the next seed
is tried, so the file holds exactly ``--num`` successful demonstrations and records each
demo's reset seed (attribute ``seed``).
"""

import argparse
import os
import time

from sparse_policy_node.sim.experts import EXPERTS
from sparse_policy_node.tools.args import check_out_path
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import ListAction
from sparse_policy_node.training.parallel import episode_results
from tqdm import tqdm

_WORKER = {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument('--task', default='lift', choices=sorted(EXPERTS),
                        help='robosuite task with a scripted expert')
    parser.add_argument('--num', type=int, default=100, help='successful demos to keep')
    parser.add_argument('--out', required=True, help='output .hdf5 path')
    parser.add_argument('--seed-start', type=int, default=0, help='first reset seed')
    parser.add_argument('--max-attempts', type=int, default=None,
                        help='give up after this many seeds (default 2 * num)')
    parser.add_argument('--workers', type=int, default=1, help='collector processes')
    parser.add_argument('--cameras', action=ListAction, nargs='*', default=['agentview'],
                        help='cameras to record, space or comma separated (none: '
                             'state-only demos)')
    parser.add_argument('--image-size', type=int, nargs=2, default=[84, 84],
                        metavar=('H', 'W'), help='camera image height and width')
    parser.add_argument('--include-object', action='store_true',
                        help='also store the object state vector')


def _init_worker(task, cameras, image_size, include_object):
    from sparse_policy_node.sim.experts import make_expert
    from sparse_policy_node.sim.robosuite_env import make_env
    _WORKER['env'] = make_env(task, cameras, image_size, include_object=include_object)
    _WORKER['expert'] = make_expert(task)


def _collect(seed):
    from sparse_policy_node.sim.experts import rollout
    success, obs, actions = rollout(_WORKER['env'], _WORKER['expert'], seed)
    return seed, success, (obs, actions) if success else None


def collect(task, num, out, seed_start=0, max_attempts=None, workers=1,
            cameras=('agentview',), image_size=(84, 84), include_object=False,
            progress=True) -> dict:
    """Collect ``num`` successful demos; return a summary (attempts, successes, seconds)."""
    from sparse_policy_node.sim.robosuite_env import make_env
    from sparse_policy_node.training.dataset import DemoWriter
    max_attempts = max_attempts or 2 * num
    init_args = (task, tuple(cameras), tuple(image_size), include_object)
    probe = make_env(*init_args[:3], include_object=include_object)
    env_args = probe.env_args()
    probe.close()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    seeds = range(seed_start, seed_start + max_attempts)
    start, attempts, failed = time.time(), 0, []
    bar = tqdm(total=num, desc=f'demos {task}', unit='demo', disable=not progress)
    with DemoWriter(out, env_args) as writer:
        with bar, episode_results(_collect, seeds, workers, _init_worker,
                                  init_args) as results:
            for seed, success, episode in results:
                attempts += 1
                if success:
                    writer.add(*episode, attrs={'seed': seed})
                    bar.update(1)
                else:
                    failed.append(seed)
                bar.set_postfix(attempts=attempts, failed=len(failed))
                if writer.count >= num:
                    break
        kept, transitions = writer.count, writer.total
    return {'task': task, 'out': out, 'kept': kept, 'attempts': attempts,
            'failed_seeds': failed, 'transitions': transitions,
            'success_rate': kept / max(attempts, 1), 'seconds': time.time() - start}


def run(args: argparse.Namespace) -> int:
    """Collect demonstrations as the arguments say."""
    check_range(args.num, '--num', low=1)
    check_range(args.max_attempts, '--max-attempts', low=1)
    check_range(args.workers, '--workers', low=1)
    check_range(min(args.image_size), '--image-size', low=1)
    check_out_path(args.out, '--out')
    summary = collect(args.task, args.num, args.out, args.seed_start, args.max_attempts,
                      args.workers, args.cameras, args.image_size, args.include_object)
    print(f'kept {summary["kept"]}/{summary["attempts"]} episodes '
          f'({100 * summary["success_rate"]:.0f}% expert success), '
          f'{summary["transitions"]} transitions in {summary["seconds"]:.0f} s -> {args.out}')
    if summary['failed_seeds']:
        print(f'failed seeds: {summary["failed_seeds"]}')
    return 0 if summary['kept'] >= args.num else 1
