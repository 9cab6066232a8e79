"""Run one simulator episode per seed, in a pool of worker processes or in this process."""

from contextlib import contextmanager
import multiprocessing
from typing import Callable
from typing import Iterable
from typing import Optional


@contextmanager
def episode_results(run_episode: Callable, seeds: Iterable[int], workers: int,
                    init_worker: Callable, init_args: tuple,
                    close_local: Optional[Callable] = None):
    """Yield ``run_episode(seed)`` results in seed order; stop the workers on exit.

    Args:
        run_episode: module-level function of one seed (picklable for the pool).
        seeds: seeds to run, consumed lazily so callers can stop early.
        workers: processes; 1 runs in this process.
        init_worker: per-process set-up (builds the simulator) called with ``init_args``.
        close_local: called on exit when running in this process (e.g. close the simulator).
    """
    if workers > 1:
        # spawn: forked MuJoCo/EGL contexts are not safe to reuse in children.
        pool = multiprocessing.get_context('spawn').Pool(workers, init_worker, init_args)
        try:
            yield pool.imap(run_episode, seeds)
        finally:
            pool.terminate()
            pool.join()
        return
    init_worker(*init_args)
    try:
        yield map(run_episode, seeds)
    finally:
        if close_local is not None:
            close_local()
