"""``sparse-policy replay-bag BAG``: replay a bag into a running policy node, check its chunks.

Start the node without a simulator and with a noise seed, e.g.::

    sparse-policy launch sim:=none use_sim_time:=true noise_seed:=7
    sparse-policy replay-bag my_bag --against-recorded

The command reads the node's parameters, plays the node's input topics from the bag at the
recorded timing, collects the chunks it publishes and recomputes each one with the offline
engine on the same observation window and noise. It prints the largest |difference| per
chunk and exits 1 when one exceeds ``--tolerance`` (2 when the replay cannot run).
``--against-recorded`` also compares the node's chunks with those recorded in the bag (same
stamps), which needs the recording to have used the same model, parameters and seed.
``--offline`` needs no node: it recomputes the recorded chunks themselves, with the node
parameters of the recording given as ``--params-file`` / ``--param``.
"""

import json
import sys


def add_arguments(parser):
    """Register the command's options."""
    parser.add_argument('bag', help='rosbag2 directory recorded by record-bag')
    parser.add_argument('--node', default='/policy_node',
                        help='fully qualified name of the running policy node')
    parser.add_argument('--tolerance', type=float, default=1e-5,
                        help='largest allowed max |difference| per chunk')
    parser.add_argument('--against-recorded', action='store_true',
                        help="also compare with the bag's recorded chunks (same stamps)")
    parser.add_argument('--rate', type=float, default=1.0, help='playback speed factor')
    parser.add_argument('--clock', choices=['auto', 'sim', 'wall'], default='auto',
                        help='sim: publish /clock and keep the stamps; wall: shift stamps to '
                             "now; auto: as the node's use_sim_time")
    parser.add_argument('--device', default='',
                        help="offline engine device (default: the node's)")
    parser.add_argument('--chunk-timeout', type=float, default=10.0,
                        help='seconds to wait for the node at each recorded chunk')
    parser.add_argument('--no-reset', action='store_true',
                        help="do not call the node's ~/reset before playing")
    parser.add_argument('--json', default='', help='also write the report to this file')
    parser.add_argument('--offline', action='store_true',
                        help="no node: recompute the bag's recorded chunks with the offline "
                             'engine, the node parameters taken from --params-file / --param')
    parser.add_argument('--params-file', action='append', default=[], metavar='YAML',
                        help="--offline: the recording node's parameter files, in order")
    parser.add_argument('--param', action='append', default=[], metavar='NAME=VALUE',
                        help="--offline: a parameter given on the recording node's command "
                             'line (YAML value)')


def format_report(report: dict, tolerance: float) -> str:
    """Render the per-chunk table and the verdict."""
    recorded = 'max_recorded_diff' in report
    lines = [f'{"stamp [s]":>12}  {"offline |diff|":>14}' + (
        f'  {"recorded |diff|":>15}' if recorded else '')]
    for row in report['chunks']:
        line = f'{row["stamp_ns"] / 1e9:12.3f}  {row["offline_max_abs_diff"]:14.3e}'
        if recorded:
            d = row['recorded_max_abs_diff']
            line += f'  {"(none)" if d is None else f"{d:.3e}":>15}'
        lines.append(line)
    lines.append(f'{report["live_chunks"]} chunks from {report["policy"]} ({report["clock"]} '
                 f'clock, noise_seed {report["noise_seed"]}, {report["published_messages"]} '
                 f'messages in {report["play_s"]:.1f} s); max |node - offline| '
                 f'{report["max_offline_diff"]:.3e} (tolerance {tolerance:g})')
    if report['kept_steps']:
        lines.append(f'{report["kept_steps"]} leading steps of late chunks were kept from the '
                     f'previous chunk by the node (execution.mode) and not compared')
    if recorded:
        lines.append(f'max |node - recorded| {report["max_recorded_diff"]:.3e} over '
                     f'{report["recorded_chunks"]} recorded chunks, '
                     f'{report["unmatched_recorded"]} without a partner')
    return '\n'.join(lines)


def verdict(report: dict, tolerance: float) -> bool:
    """Return True when every compared chunk is within ``tolerance``."""
    ok = report['max_offline_diff'] <= tolerance
    if 'max_recorded_diff' in report:
        ok = ok and report['max_recorded_diff'] <= tolerance \
            and report['unmatched_recorded'] == 0
    return ok


def run(args) -> int:
    """Replay, compare, print; exit 0 (match), 1 (above tolerance) or 2 (cannot replay)."""
    import rclpy
    from sparse_policy_node.bags.offline import ReplayError
    from sparse_policy_node.bags.replay import replay_bag
    from sparse_policy_node.bags.rosbag_io import BagError
    from sparse_policy_node.core.checkpoint import CheckpointError
    from sparse_policy_node.core.config import ConfigError
    if args.offline:
        return run_offline(args)
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        report = replay_bag(context, args.bag, args.node, args.rate, args.against_recorded,
                            args.device, args.clock, not args.no_reset, args.chunk_timeout,
                            tolerance=args.tolerance)
    except (ReplayError, BagError, CheckpointError, ConfigError) as exc:
        print(f'replay-bag: {exc}', file=sys.stderr)
        return 2
    finally:
        context.try_shutdown()
    return finish(report, args, format_report(report, args.tolerance), 'chunks match')


def run_offline(args) -> int:
    """``--offline``: compare the recorded chunks with the offline engine (no ROS graph)."""
    import yaml
    from sparse_policy_node.bags.offline import ReplayError
    from sparse_policy_node.bags.replay import check_recorded
    from sparse_policy_node.bags.replay import node_values
    from sparse_policy_node.bags.rosbag_io import BagError
    from sparse_policy_node.core.checkpoint import CheckpointError
    from sparse_policy_node.core.config import ConfigError
    overrides = {}
    for entry in args.param:
        name, sep, value = entry.partition('=')
        if not sep or not name:
            print(f'replay-bag: --param {entry!r} must look like NAME=VALUE', file=sys.stderr)
            return 2
        overrides[name] = yaml.safe_load(value)
    try:
        values = node_values(args.params_file, overrides, args.node)
        report = check_recorded(args.bag, values, args.node, args.device,
                                tolerance=args.tolerance)
    except (ReplayError, BagError, CheckpointError, ConfigError, OSError) as exc:
        print(f'replay-bag: {exc}', file=sys.stderr)
        return 2
    table = format_report(report, args.tolerance).replace('node - offline', 'recorded - offline')
    return finish(report, args, table, 'recorded chunks match')


def finish(report: dict, args, table: str, match_text: str) -> int:
    """Print the table, write ``--json``, print the verdict; return the exit status."""
    print(table)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=2)
    ok = verdict(report, args.tolerance)
    print('replay-bag: ' + (match_text if ok else 'MISMATCH above tolerance'))
    return 0 if ok else 1
