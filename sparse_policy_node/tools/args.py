"""Argument handling shared by the ``sparse-policy`` subcommands.

One way to name a model (``--model DIR``), lists that take spaces or commas, and checks of
the inputs (model directory, files, value ranges) made as soon as the arguments are read,
before any simulator, node or training run starts. A failed check raises
:class:`CommandError`, which ``sparse-policy`` prints as one line and exits 2 with. The module
imports neither torch nor ROS at import time.
"""

import argparse
import os
import sys


class CommandError(ValueError):
    """A wrong command-line input: ``sparse-policy`` prints it as one line and exits 2."""


class ListAction(argparse.Action):
    """A list option that takes its values space or comma separated (``a b``, ``a,b``).

    ``check`` (optional) converts and validates each item; its ``ValueError`` or
    ``TypeError`` becomes an argparse error naming the option.
    """

    def __init__(self, option_strings, dest, check=None, **kwargs):
        kwargs.setdefault('nargs', '+')
        super().__init__(option_strings, dest, **kwargs)
        self.check = check

    def __call__(self, parser, namespace, values, option_string=None):
        """Split, check and store the values."""
        items = [v.strip() for value in values for v in str(value).split(',') if v.strip()]
        if self.check is not None:
            try:
                items = [self.check(item) for item in items]
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                raise argparse.ArgumentError(self, str(exc)) from exc
        setattr(namespace, self.dest, items)


def reuse_direction(name: str) -> str:
    """Check one reuse direction (``ListAction`` check of ``--directions``); return it."""
    from sparse_policy_node.core.config import REUSE_DIRECTIONS
    if name not in REUSE_DIRECTIONS:
        raise ValueError(f'unknown direction {name!r}; choose from {", ".join(REUSE_DIRECTIONS)}')
    return name


def add_model_argument(parser, default=None, help_text='model directory (config.json + '
                       'model.safetensors)', positional: bool = False) -> None:
    """Add ``--model DIR``; with ``positional``, also the deprecated positional form."""
    parser.add_argument('--model', default=default, metavar='DIR', help=help_text)
    if positional:
        parser.add_argument('model_positional', nargs='?', default=None, metavar='MODEL',
                            help='deprecated: the model directory given positionally; use '
                                 '--model DIR')


def add_episode_arguments(parser, *, task: bool = True, schedule: bool = True,
                          max_steps: bool = True, workers: bool = True) -> None:
    """Add the options every closed-loop command shares, worded the same everywhere.

    ``--task``, ``--sampler`` / ``--steps`` (``schedule``), ``--max-steps``, ``--workers``
    and ``--threads``; each command adds its own ``--episodes`` and ``--seed-start`` (their
    defaults keep the commands' seed ranges apart).
    """
    if task:
        parser.add_argument('--task', help='task (default: the one the model was trained on)')
    if schedule:
        from sparse_policy_node.core.config import SAMPLERS  # no torch import
        parser.add_argument('--sampler', choices=SAMPLERS, help="default: the model's own")
        parser.add_argument('--steps', type=int,
                            help="denoising steps K (default: the model's)")
    if max_steps:
        parser.add_argument('--max-steps', type=int,
                            help="episode limit (default: the task's)")
    if workers:
        parser.add_argument('--workers', type=int, default=1,
                            help='simulator processes (one episode each at a time)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads per process' if workers else 'torch threads')


def check_episode_arguments(args) -> None:
    """Check the :func:`add_episode_arguments` options ``args`` has: each at least 1.

    Raises:
        CommandError: ``--steps``, ``--max-steps``, ``--workers`` or ``--threads`` below 1.
    """
    for dest in ('steps', 'max_steps', 'workers', 'threads'):
        check_range(getattr(args, dest, None), '--' + dest.replace('_', '-'), low=1)


def resolve_model(args, command: str) -> str:
    """Apply the deprecated positional model directory; return ``args.model``.

    Prints a one-line deprecation note on stderr when the positional form was used.
    """
    positional = getattr(args, 'model_positional', None)
    if positional:
        if args.model and args.model != positional:
            raise CommandError(f'model directory given twice ({positional!r} and --model '
                               f'{args.model!r}); give it once, as --model DIR')
        print(f'sparse-policy {command}: note: a positional model directory is deprecated; '
              f'use --model {positional}', file=sys.stderr)
        args.model = positional
    if not args.model:
        raise CommandError('no model directory given; pass --model DIR (a directory with '
                           'config.json and model.safetensors, e.g. models/lift)')
    return args.model


def check_model_dir(path: str, weights: bool = True, pruners: bool = False):
    """Check a model directory without running it; return its policy config.

    Args:
        path: the directory.
        weights: also load the policy weights (on the CPU), checking every tensor.
        pruners: also load its pruners (each checked against the policy weights).

    Raises:
        CommandError: ``path`` is empty or a file.
        CheckpointError: the directory is missing, or a file in it is corrupt or does not
            match the model.
    """
    from sparse_policy_node.core.checkpoint import load_policy
    from sparse_policy_node.core.checkpoint import load_policy_config
    from sparse_policy_node.core.checkpoint import load_pruners
    if not path:
        raise CommandError('no model directory given; pass --model DIR (a directory with '
                           'config.json and model.safetensors, e.g. models/lift)')
    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f'{path!r} is a file, not a model directory; pass the directory '
                           f'that holds config.json and model.safetensors')
    config = load_policy_config(path)
    if weights:
        load_policy(path, 'cpu')
    if pruners:
        load_pruners(path, 'cpu')
    return config


def check_file(path: str, what: str, hint: str) -> str:
    """Raise :class:`CommandError` unless ``path`` is an existing file; return it."""
    if not path or not os.path.isfile(path):
        state = 'is a directory' if path and os.path.isdir(path) else 'does not exist'
        raise CommandError(f'{what} {path!r} {state}; {hint}')
    return path


def check_out_path(path: str, option: str) -> str:
    """Raise :class:`CommandError` when the file ``path`` cannot be created; return it."""
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise CommandError(f'{option} {path!r} cannot be created ({probe!r} is not a writable '
                           f'directory); choose another path')
    if os.path.isdir(path):
        raise CommandError(f'{option} {path!r} is a directory; give a file path')
    return path


def check_range(value, option: str, low=None, high=None, hint: str = '') -> None:
    """Raise :class:`CommandError` unless ``low <= value <= high`` (None: open)."""
    if value is None:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f'in [{low}, {high}]' if low is not None and high is not None
                  else f'>= {low}' if low is not None else f'<= {high}')
        raise CommandError(f'{option} must be {bounds}, got {value}'
                           + (f'; {hint}' if hint else ''))


def check_positive(value, option: str, hint: str = '') -> None:
    """Raise :class:`CommandError` unless ``value > 0`` (None passes)."""
    if value is not None and not value > 0:
        raise CommandError(f'{option} must be > 0, got {value}' + (f'; {hint}' if hint else ''))


def check_bag(path: str) -> dict:
    """Open a rosbag2 bag's metadata; return ``{topic: type}``, raise ``BagError`` if unreadable.

    (``bag_topics`` alone lets a corrupt ``metadata.yaml`` escape as the reader's own error.)
    """
    from sparse_policy_node.bags.rosbag_io import bag_topics
    from sparse_policy_node.bags.rosbag_io import BagError
    try:
        return bag_topics(path)
    except BagError:
        raise
    except Exception as exc:  # noqa: B902 - rosbags raises its own error types per storage
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BagError(f'bag {path!r} cannot be read ({reason})') from exc


def check_rollouts(path: str, option: str = '--rollouts') -> dict:
    """Check a rollout file (``sparse-policy rollouts``) and return its attributes."""
    check_file(path, f'{option}', 'record one with sparse-policy rollouts')
    from sparse_policy_node.training.rollouts import read_rollout_attrs
    try:
        return read_rollout_attrs(path)
    except (OSError, KeyError, ValueError) as exc:
        raise CommandError(f'{option} {path!r} is not a rollout file ({exc}); record one '
                           f'with sparse-policy rollouts') from exc


def check_task(task: str) -> str:
    """Raise :class:`CommandError` unless ``task`` is a simulator task; return it."""
    from sparse_policy_node.sim.robosuite_env import TASKS
    if task not in TASKS:
        raise CommandError(f'unknown task {task!r}; choose from {", ".join(sorted(TASKS))}')
    return task
