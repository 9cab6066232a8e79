"""``sparse-policy`` command line: one subcommand per pipeline stage.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``
(returning an exit code); modules are imported only when their command runs, so
``sparse-policy --help`` stays fast and works without the simulator or ROS installed.

Errors: a mistake of the user (a bad path or file, a bad value, a missing pruner: the
project's own exception types, :class:`~sparse_policy_node.tools.args.CommandError` among
them, and missing or unreadable files) is printed as one line,
``sparse-policy <command>: error: <what is wrong>; <what to do>``, with exit status 2; the
subcommands check their inputs before they start a simulator, a node or a training run.
Ctrl-C ends quietly with status 130. Any other exception is a bug and keeps its traceback.
"""

import argparse
import importlib
import sys
import textwrap

# name -> (module, one-line help)
COMMANDS = {
    'info': ('sparse_policy_node.tools.info',
             'describe a model directory or preset (sizes, FLOPs, a timed smoke chunk)'),
    'bench': ('sparse_policy_node.tools.bench',
              'benchmark dense vs sparse chunk latency and FLOPs side by side'),
    'precision': ('sparse_policy_node.tools.precision',
                  'float16 / bfloat16 and CUDA graphs against the float32 engine: action error '
                  'on recorded observation windows with identical noise, and chunk latency'),
    'export': ('sparse_policy_node.tools.export',
               'export a model directory as ONNX graphs (per unit, with a manifest) or '
               'TensorRT engines'),
    'import-dp': ('sparse_policy_node.tools.import_dp',
                  'convert a Diffusion Policy DP-T checkpoint into a model directory'),
    'demos': ('sparse_policy_node.training.demos',
              'collect scripted demonstrations of a robosuite task into robomimic HDF5'),
    'train-policy': ('sparse_policy_node.training.train_policy',
                     'train a diffusion policy from a YAML config (torchrun for several '
                     'processes)'),
    'eval': ('sparse_policy_node.training.evaluate',
             'success rate of a model over a seed range in the simulator (dense and sparse '
             'variants)'),
    'latency': ('sparse_policy_node.training.latency',
                'closed loop under injected inference latency: success, underruns and jerk at '
                'chunk boundaries for replace, blend and rtc execution'),
    'frontier': ('sparse_policy_node.training.frontier',
                 'speed/success frontier of a model (dense, DDIM-K, learned sparsity per '
                 'schedule); --install writes the serving default'),
    'rollouts': ('sparse_policy_node.training.rollouts',
                 'record dense rollouts (obs windows, noise, chunks) for pruner training'),
    'train-pruner': ('sparse_policy_node.training.train_pruner',
                     'train the TTS pruner of a model on recorded rollouts'),
    'train-efficiency': ('sparse_policy_node.training.efficiency',
                         'success at the matched sparsity against the number of training '
                         'trajectories of the pruner (JSON + plot)'),
    'similarity': ('sparse_policy_node.training.similarity',
                   "similarity of every unit's output across control steps of dense "
                   'episodes (JSON + heat map)'),
    'masks': ('sparse_policy_node.tools.masks',
              'draw the gate maps (steps x units) of a recorded episode as a PNG'),
    'bench-node': ('sparse_policy_node.tools.bench_node',
                   'policy node + robosuite bridge: observation-to-chunk latency and keeping '
                   'up, sparse next to dense'),
    'record-bag': ('sparse_policy_node.tools.record_bag',
                   'record the policy node inputs and outputs to a rosbag2 (MCAP or sqlite3)'),
    'replay-bag': ('sparse_policy_node.tools.replay_bag',
                   'replay a bag into a running policy node (sim:=none) and check its chunks '
                   'against the offline engine (seeded noise)'),
    'dataset-from-bag': ('sparse_policy_node.tools.dataset_from_bag',
                         'teleoperation bags -> robomimic-layout HDF5 demos for train-policy'),
    'model-card': ('sparse_policy_node.tools.model_card',
                   "show or write a model's card (action space, frames, rate, inputs)"),
    'launch': ('sparse_policy_node.ros.bringup',
               'start the policy node (and the robosuite bridge) like ros2 launch, rclpy only'),
}


# name -> one example command line, shown at the end of the command's --help
EXAMPLES = {
    'info': 'sparse-policy info --model models/lift',
    'bench': 'sparse-policy bench --model models/lift --reps 20 --baselines',
    'precision': 'sparse-policy precision --model models/lift --rollouts '
                 'data/lift_rollouts.hdf5 --device cuda --cuda-graphs',
    'export': 'sparse-policy export --model models/lift --format onnx',
    'import-dp': 'sparse-policy import-dp ema.safetensors models/dp_lift --config '
                 'dp_config.json',
    'demos': 'sparse-policy demos --task lift --num 100 --out data/lift_demos.hdf5 --workers 2',
    'train-policy': 'sparse-policy train-policy --config config/train/lift_small.yaml',
    'eval': 'sparse-policy eval --model models/lift --episodes 50 --variants dense sparse '
            'ddim-10',
    'latency': 'sparse-policy latency --model models/lift --latency-ms 0 100 200 300 '
               '--episodes 50 --out docs/latency',
    'frontier': 'sparse-policy frontier --model models/lift --episodes 50 --out runs/frontier '
                '--install',
    'rollouts': 'sparse-policy rollouts --model models/lift --out data/lift_rollouts.hdf5 '
                '--num 32 --seed-start 50000',
    'train-pruner': 'sparse-policy train-pruner --model models/lift --rollouts '
                    'data/lift_rollouts.hdf5 --out runs/lift_pruner --install',
    'train-efficiency': 'sparse-policy train-efficiency --model models/lift --rollouts '
                        'data/lift_rollouts.hdf5 --trajectories 1 2 4 8 --train-seeds 0 1 '
                        '--out runs/efficiency_lift',
    'similarity': 'sparse-policy similarity --model models/lift --episodes 5 --seed-start '
                  '861000 --out runs/similarity_lift',
    'masks': 'sparse-policy masks --model models/lift --rollouts data/lift_rollouts.hdf5 '
             '--out masks.png',
    'bench-node': 'sparse-policy bench-node --model models/lift --variants learned off '
                  '--episodes 3',
    'record-bag': 'sparse-policy record-bag bags/run1 --duration 60',
    'replay-bag': 'sparse-policy replay-bag bags/run1 --against-recorded --json-out '
                  'report.json',
    'dataset-from-bag': 'sparse-policy dataset-from-bag bags/demo_* --out demos.hdf5 '
                        '--camera agentview=agentview/image_raw --action-topic /teleop/command',
    'model-card': 'sparse-policy model-card --model models/lift --write',
    'launch': 'sparse-policy launch sim:=robosuite task:=lift sparsity:=learned episodes:=5',
}

# Advice for an error message that carries none, by exception type name.
HINTS = {
    'CheckpointError': 'give a model directory with a valid config.json and '
                       'model.safetensors (as train-policy or import-dp write them, e.g. '
                       'models/lift)',
    'BagError': 'pass a rosbag2 directory (sparse-policy record-bag writes one)',
}
# Standard exceptions that are the user's mistake: a path that is missing, not a file, ...
USER_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """Show each option's default (unless its help already says it, or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ''
        default = action.default
        if '(default' in text or 'default:' in text or default is argparse.SUPPRESS \
                or default is None or default is False \
                or (isinstance(default, (str, list, tuple)) and not default) \
                or not (action.option_strings or action.nargs in ('?', '*')):
            return text
        shown = ' '.join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f'{text} (default: {str(shown).replace("%", "%%")})'.strip()


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: a mistake in the arguments is one line and exit status 2."""

    def error(self, message):
        """Print ``<prog>: error: <message>; see <prog> --help`` and exit 2."""
        self.exit(2, f'{self.prog}: error: {message}; see {self.prog} --help\n')


class ReportedError(SystemExit):
    """Exit status 2 after the one-line message was printed; ``str()`` is the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def build_parser() -> argparse.ArgumentParser:
    """Create the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog='sparse-policy',
        description='Diffusion policy with test-time sparsity: train, evaluate, benchmark, '
                    'serve.',
        epilog='Run sparse-policy COMMAND --help for the options of a command, their defaults '
               'and an example.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def command_parser(name: str, module=None) -> argparse.ArgumentParser:
    """Return the parser of subcommand ``name`` (imports its module unless given)."""
    module_name, help_text = COMMANDS[name]
    module = module or importlib.import_module(module_name)
    parser = CommandParser(prog=f'sparse-policy {name}',
                           description=textwrap.fill(help_text, 79),
                           epilog=f'example:\n  {EXAMPLES[name]}',
                           formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return parser


def is_user_error(exc: BaseException) -> bool:
    """Tell the user's mistakes (the project's exception types, bad paths) from bugs."""
    if isinstance(exc, USER_ERRORS):
        return True
    return any(cls.__module__.startswith('sparse_policy_node.')
               for cls in type(exc).__mro__ if cls not in (BaseException, object))


def error_line(name: str, message, hint: str = '') -> str:
    """``sparse-policy <name>: error: <message>; <advice>`` on one line."""
    text = ' '.join(str(message).split()) or type(message).__name__
    for prefix in (f'sparse-policy {name}: ', f'{name}: ', 'error: '):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if ';' not in text:
        text = f'{text.rstrip(".")}; {hint or f"see sparse-policy {name} --help"}'
    return f'sparse-policy {name}: error: {text}'


def main(argv=None) -> int:
    """Entry point of the ``sparse-policy`` console script.

    Returns the command's exit status (2 after a reported error, 130 after Ctrl-C). Like
    argparse's own errors, a subcommand's ``SystemExit('message')`` is reported as one line
    and raised again as ``SystemExit`` with status 2 (``str()``: the message).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] in ('-h', '--help') or argv[0] not in COMMANDS:
        if argv and argv[0] not in ('-h', '--help'):
            parser.print_usage(sys.stderr)
            print(f'sparse-policy: unknown command {argv[0]!r}; choose from '
                  f'{", ".join(COMMANDS)}', file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    try:
        module = importlib.import_module(COMMANDS[name][0])  # torch: seconds, Ctrl-C welcome
        args = command_parser(name, module).parse_args(argv[1:])
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        line = error_line(name, exc.code)
        print(line, file=sys.stderr)
        raise ReportedError(line.split(': error: ', 1)[1]) from None
    except Exception as exc:  # noqa: B902 - only the user's mistakes are reported, see below
        if not is_user_error(exc):
            raise
        print(error_line(name, exc, HINTS.get(type(exc).__name__, '')), file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
