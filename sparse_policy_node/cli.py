"""``sparse-policy`` command line: one subcommand per pipeline stage.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``
(returning an exit code); modules are imported only when their command runs, so
``sparse-policy --help`` stays fast and works without the simulator or ROS installed.
"""

import argparse
import importlib
import sys

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
    'frontier': ('sparse_policy_node.training.frontier',
                 'speed/success frontier of a model (dense, DDIM-K, learned sparsity per '
                 'schedule); --install writes the serving default'),
    'rollouts': ('sparse_policy_node.training.rollouts',
                 'record dense rollouts (obs windows, noise, chunks) for pruner training'),
    'train-pruner': ('sparse_policy_node.training.train_pruner',
                     'train the TTS pruner of a model on recorded rollouts'),
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


def build_parser() -> argparse.ArgumentParser:
    """Create the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog='sparse-policy',
        description='Diffusion policy with test-time sparsity: train, evaluate, benchmark, '
                    'serve.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``sparse-policy`` console script."""
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
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f'sparse-policy {name}', description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
