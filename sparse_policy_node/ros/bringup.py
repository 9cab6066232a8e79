"""``sparse-policy launch``: the rclpy-only bring-up, for ROS 2 installed from pip wheels.

Takes the same ``name:=value`` arguments as ``launch/policy.launch.py`` and starts the same
nodes (from the shared plan in :mod:`sparse_policy_node.ros.launch_args`) as child processes
with ``--ros-args --params-file``. SIGINT and SIGTERM are forwarded to every child's process
group; when any node exits (the bridge after its episodes, or a node that failed to start)
the others are stopped too, and a run summary is printed.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import List

from sparse_policy_node.ros.launch_args import NodePlan
from sparse_policy_node.ros.launch_args import parse_launch_args
from sparse_policy_node.ros.launch_args import plan_nodes
from sparse_policy_node.ros.launch_args import show_args
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import CommandError
import yaml

STOP_TIMEOUT_S = 10.0


def add_arguments(parser) -> None:
    """Register the ``launch`` subcommand's arguments."""
    parser.add_argument('launch_args', nargs='*', metavar='name:=value',
                        help='launch arguments, as for ros2 launch (see --show-args)')
    parser.add_argument('-s', '--show-args', action='store_true',
                        help='list the launch arguments and their defaults, then exit')


def node_command(node: NodePlan, overrides_file: str) -> List[str]:
    """Return the command line that starts ``node`` (what ros2 launch would run)."""
    cmd = [sys.executable, '-m', node.module, '--ros-args', '-r', f'__node:={node.name}']
    if node.namespace:
        cmd += ['-r', f'__ns:={node.namespace}']
    for src, dst in node.remappings:
        cmd += ['-r', f'{src}:={dst}']
    for path in node.params_files:
        cmd += ['--params-file', path]
    return cmd + ['--params-file', overrides_file, '--log-level', node.log_level]


def write_overrides(node: NodePlan, directory: str) -> str:
    """Write the node's argument-derived parameters as a ``/**: ros__parameters`` file."""
    path = os.path.join(directory, f'{node.name}_overrides.yaml')
    with open(path, 'w') as f:
        yaml.safe_dump({'/**': {'ros__parameters': node.overrides}}, f)
    return path


def _stop(procs, sig) -> None:
    """Signal every live child's process group, escalating to SIGTERM and SIGKILL."""
    for sig_now, wait_s in ((sig, STOP_TIMEOUT_S), (signal.SIGTERM, 5.0),
                            (signal.SIGKILL, 5.0)):
        live = [p for p in procs if p.poll() is None]
        if not live:
            return
        for p in live:
            try:
                os.killpg(p.pid, sig_now)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(p.poll() is None for p in live):
            time.sleep(0.05)


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def format_summary(policy: dict, bridge: dict) -> str:
    """Render the run summary printed at the end of a bring-up."""
    lines = ['', '==== sparse-policy launch: summary ====']
    if bridge:
        lines.append(f'{bridge.get("task")}: {bridge.get("episodes", 0)} episodes, success '
                     f'rate {bridge.get("success_rate", float("nan")):.0%} '
                     f'({bridge.get("successes", 0)}/{bridge.get("episodes", 0)}), mean '
                     f'length {bridge.get("mean_length", float("nan")):.0f} steps, '
                     f'{bridge.get("steps_per_wall_s", float("nan")):.1f} sim steps per '
                     f'wall second')
    if policy:
        lines.append(f'chunks: {policy.get("chunks", 0)} ({policy.get("dense_chunks", 0)} '
                     f'dense), {policy.get("chunk_rate_hz", 0.0):.2f} chunks/s wall')
        lines.append(f'chunk latency p50 {policy.get("latency_p50_ms", float("nan")):.1f} ms, '
                     f'p99 {policy.get("latency_p99_ms", float("nan")):.1f} ms; '
                     f'observation-to-chunk p50 '
                     f'{policy.get("obs_to_chunk_p50_ms", float("nan")):.1f} ms, p99 '
                     f'{policy.get("obs_to_chunk_p99_ms", float("nan")):.1f} ms')
        lines.append(f'without the first (dense) chunk of each episode: observation-to-chunk '
                     f'p50 {policy.get("steady_obs_to_chunk_p50_ms", float("nan")):.1f} ms, '
                     f'p99 {policy.get("steady_obs_to_chunk_p99_ms", float("nan")):.1f} ms')
        lines.append(f'realized sparsity {policy.get("realized_sparsity", float("nan")):.3f}')
        problems = {k: v for k, v in policy.items()
                    if k.startswith(('rejected', 'dropped', 'stale', 'discarded', 'worker'))}
        if problems:
            lines.append(f'inputs/chunks not used: {problems}')
    return '\n'.join(lines)


def run(args) -> int:
    """Start the planned nodes, wait for the first to end, stop the rest, print a summary."""
    if args.show_args:
        print(show_args())
        return 0
    try:
        values = parse_launch_args(args.launch_args)
        work = tempfile.mkdtemp(prefix='sparse_policy_launch_')
        values['summary_dir'] = values['summary_dir'] or work
        plan = plan_nodes(values)
    except ValueError as exc:
        raise CommandError(f'{exc}; see sparse-policy launch --show-args') from exc
    # Checked before any node starts; a bad model raises CheckpointError (one line, exit 2).
    if values['model']:
        check_model_dir(values['model'], pruners=True)
    for path in (p for node in plan for p in node.params_files):
        if not os.path.isfile(path):
            raise CommandError(f'parameter file {path} does not exist; pass params_file:= / '
                               f'bridge_params_file:= with an existing file')
    try:
        os.makedirs(values['summary_dir'], exist_ok=True)
    except OSError as exc:
        raise CommandError(f'summary_dir:={values["summary_dir"]} cannot be created ({exc}); '
                           f'pass another directory') from exc
    received = []

    def on_signal(signum, _frame):
        received.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs, ended = [], []
    try:
        for node in plan:
            cmd = node_command(node, write_overrides(node, work))
            # Own process group: the bring-up alone decides when and how children stop.
            procs.append(subprocess.Popen(cmd, start_new_session=True))
            print(f'[launch] started {node.name} (pid {procs[-1].pid}): {" ".join(cmd)}',
                  flush=True)
        while not received and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        ended = [(n.name, p.returncode) for n, p in zip(plan, procs) if p.poll() is not None]
        _stop(procs, signal.SIGINT if not received else received[0])
    finally:
        _stop(procs, signal.SIGTERM)
        for s, handler in previous.items():
            signal.signal(s, handler)
    summary_dir = values['summary_dir']
    print(format_summary(_read(os.path.join(summary_dir, 'policy_node.json')),
                         _read(os.path.join(summary_dir, 'sim_bridge.json'))), flush=True)
    failed = [(name, code) for name, code in ended if code != 0]
    if failed and not received:
        print(f'[launch] {failed[0][0]} exited with code {failed[0][1]}', file=sys.stderr)
        return 1
    return 0
