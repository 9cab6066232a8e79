"""``sparse-policy replay-bag BAG``: replay a bag into a running policy node, check its chunks.

Start the node without a simulator and with a noise seed, e.g.::

    sparse-policy launch sim:=none use_sim_time:=true noise_seed:=7
    sparse-policy replay-bag my_bag --against-recorded

The command reads the node's parameters, plays the node's input topics from the bag at the
recorded timing, collects the chunks it publishes and recomputes each one with the offline
engine on the same observation window and noise. It prints the largest |difference| per
chunk and exits 1 when one exceeds ``--tolerance`` (2 when the replay cannot run: the bag
and the values are checked before the node is contacted). ``--json-out PATH`` also writes
the report as JSON (``--json PATH`` is its deprecated spelling).
``--against-recorded`` also compares the node's chunks with those recorded in the bag (same
stamps), which needs the recording to have used the same model, parameters and seed.
``--offline`` needs no node: it recomputes the recorded chunks themselves, with the node
parameters of the recording given as ``--params-file`` / ``--param``.
"""

import json
import sys

from sparse_policy_node.tools.args import check_bag
from sparse_policy_node.tools.args import check_file
from sparse_policy_node.tools.args import check_positive
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import CommandError


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
    parser.add_argument('--json-out', default='', metavar='PATH',
                        help='also write the report to this JSON file')
    parser.add_argument('--json', default='', metavar='PATH', dest='json_legacy',
                        help='deprecated spelling of --json-out')
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


def check_args(args) -> dict:
    """Check the values and the bag before any node is contacted; return --param's values.

    Errors (a bad value, a missing or unreadable bag, a missing parameter file) raise
    ``CommandError`` / ``BagError``: one line from ``sparse-policy``, exit status 2.
    """
    import yaml
    if args.json_legacy:
        print(f'sparse-policy replay-bag: note: --json PATH is deprecated; use --json-out '
              f'{args.json_legacy}', file=sys.stderr)
        args.json_out = args.json_out or args.json_legacy
    check_positive(args.rate, '--rate', '1 plays at the recorded speed')
    check_range(args.tolerance, '--tolerance', low=0.0)
    check_positive(args.chunk_timeout, '--chunk-timeout')
    overrides = {}
    for entry in args.param:
        name, sep, value = entry.partition('=')
        if not sep or not name:
            raise CommandError(f'--param {entry!r} must look like NAME=VALUE')
        overrides[name] = yaml.safe_load(value)
    check_bag(args.bag)  # BagError: missing, or not a rosbag2 bag
    for path in args.params_file:
        check_file(path, '--params-file', "pass the recording node's parameter file")
    return overrides


def run(args) -> int:
    """Replay, compare, print; exit 0 (match), 1 (above tolerance) or 2 (cannot replay)."""
    overrides = check_args(args)
    if args.offline:
        return run_offline(args, overrides)
    import rclpy
    from sparse_policy_node.bags.replay import replay_bag
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        report = replay_bag(context, args.bag, args.node, args.rate, args.against_recorded,
                            args.device, args.clock, not args.no_reset, args.chunk_timeout,
                            tolerance=args.tolerance)
    finally:
        context.try_shutdown()
    return finish(report, args, format_report(report, args.tolerance), 'chunks match')


def run_offline(args, overrides: dict) -> int:
    """``--offline``: compare the recorded chunks with the offline engine (no ROS graph)."""
    from sparse_policy_node.bags.replay import check_recorded
    from sparse_policy_node.bags.replay import node_values
    values = node_values(args.params_file, overrides, args.node)
    report = check_recorded(args.bag, values, args.node, args.device, tolerance=args.tolerance)
    table = format_report(report, args.tolerance).replace('node - offline', 'recorded - offline')
    return finish(report, args, table, 'recorded chunks match')


def finish(report: dict, args, table: str, match_text: str) -> int:
    """Print the table, write ``--json-out``, print the verdict; return the exit status."""
    print(table)
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump(report, f, indent=2)
    ok = verdict(report, args.tolerance)
    print('replay-bag: ' + (match_text if ok else 'MISMATCH above tolerance'))
    return 0 if ok else 1
