"""``sparse-policy bench-node``: the policy node with the robosuite bridge in the loop.

Runs the bring-up (``sparse-policy launch``: policy node + bridge, real processes and topics)
once per sparsity variant on the same episodes (same seeds), one variant after the other, and
prints the node's observation-to-chunk latency (newest input arrival to chunk published, image
encoding included) next to the dense variant's.

Modes:

* ``realtime`` (default): the bridge steps on the wall clock at its control rate and holds
  still on any step no chunk covers yet (an *underrun*). The node replans when the previous
  chunk has been executed, so a chunk must arrive within one control period of the observation
  it is computed from. ``underrun_share`` is the share of steps the robot held still because
  the policy fell behind; ``startup_underruns`` counts the steps of each episode spent waiting
  for its first chunk (dense by rule, the slowest), reported apart. ``--replan-lead 1`` starts
  each chunk one step early, which gives it one more control period.
  ``--real-time-factor 0.25`` runs the world four times slower than the wall clock (sim time
  keeps one control period per step): the latency the world sees is the wall latency times
  the factor, and a shared CPU that cannot step the simulator at 20 Hz keeps the pace.
  ``--execution-mode rtc`` measures real-time chunking in the loop;
  ``--emulated-latency-ms 200`` holds every chunk until 200 ms (sim time) after its
  observation, the known latency of a ``sparse-policy latency`` point, with the node's own
  code in the loop. ``arrival_delay_steps`` counts, per chunk, the control steps that ran
  between its observation and its arrival at the bridge: the delay the world saw.
* ``lockstep``: the bridge waits for every chunk (sim time pauses), so the latencies are
  measured without time pressure and episodes do not depend on CPU speed.

``obs_to_chunk_p50_ms`` / ``p99`` leave out the first chunk of each episode (dense by rule in
every variant); ``all_chunks_p99_ms`` includes it. ``stamp_to_chunk_p90_ms`` is the
observation stamp to publication on the node's clock (sim time in the bring-up): the latency
the world sees, the one rtc's delay is estimated from.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import check_task
from sparse_policy_node.tools.args import CommandError
from sparse_policy_node.tools.args import ListAction
import yaml

COLUMNS = (('variant', '{}'), ('success', '{}'), ('chunks', '{}'),
           ('obs_to_chunk_p50_ms', '{:.1f}'), ('obs_to_chunk_p99_ms', '{:.1f}'),
           ('all_chunks_p99_ms', '{:.1f}'), ('arrival_delay_p50_steps', '{:.1f}'),
           ('underrun_share', '{:.3f}'), ('jerk_boundary_vs_within', '{:.2f}'),
           ('startup_underruns', '{}'), ('realized_sparsity', '{:.3f}'))


def add_arguments(parser) -> None:
    """Register the command's options."""
    add_model_argument(parser, default='models/lift')
    parser.add_argument('--task', default='lift', help='robosuite task of the bridge')
    parser.add_argument('--episodes', type=int, default=3, help='episodes per variant')
    parser.add_argument('--seed', type=int, default=100000, help='seed of the first episode')
    parser.add_argument('--variants', action=ListAction, default=['learned', 'off'],
                        check=_variant,
                        help='values of the sparsity launch argument, space or comma '
                             'separated: learned, off (dense) or a target in [0, 0.99]; the '
                             'first "off" is the reference of the ratios')
    parser.add_argument('--steps', type=int, default=None,
                        help="denoising steps (default: the model's)")
    parser.add_argument('--device', default='',
                        help='torch device of the policy node (cpu, cuda, cuda:N; default: '
                             "the parameter file's)")
    parser.add_argument('--mode', default='realtime', choices=('realtime', 'lockstep'),
                        help='realtime: the bridge runs on the wall clock and holds still on '
                             'underruns; lockstep: it waits for every chunk')
    parser.add_argument('--replan-lead', type=int, default=0,
                        help='replan_lead_steps of the policy node: start the next chunk that '
                             'many steps before the current one runs out (hides latency in '
                             'realtime mode)')
    parser.add_argument('--execution-mode', default='',
                        choices=('', 'replace', 'blend', 'rtc', 'ensemble'),
                        help="the policy node's execution.mode (default: the parameter "
                             "file's); rtc starts each chunk d measured steps early")
    parser.add_argument('--real-time-factor', type=float, default=1.0,
                        help='realtime mode: the pace of the simulated world against the wall '
                             "clock (the bridge's real_time_factor): 0.25 runs it four times "
                             "slower, so the node's latency in sim time is a quarter of its "
                             'wall latency and a busy CPU cannot slow the control rate')
    parser.add_argument('--emulated-latency-ms', type=float, default=0.0,
                        help="realtime mode: the node's execution.emulated_latency_s: each "
                             'chunk is published no earlier than this long (sim time) after '
                             'its observation, a known latency with the node in the loop '
                             '(the sweep of sparse-policy latency, measured on the node)')
    parser.add_argument('--params-file', default='',
                        help='base policy node parameter file (default: config/policy.yaml)')
    parser.add_argument('--bridge-params-file', default='',
                        help='base bridge parameter file (default: config/sim_bridge.yaml)')
    parser.add_argument('--max-episode-steps', type=int, default=200,
                        help='episode length limit of the bridge')
    parser.add_argument('--out', default='', help='directory for the per-variant summaries '
                        '(default: a temporary directory)')
    parser.add_argument('--json', action='store_true', help='print one JSON object only')


def _variant(value: str) -> str:
    from sparse_policy_node.ros.launch_args import sparsity_overrides
    sparsity_overrides(value)  # ValueError names the forms
    return value


def check_args(args) -> None:
    """Check the values, the model and the task before any bring-up starts."""
    check_range(args.episodes, '--episodes', low=1)
    check_range(args.steps, '--steps', low=1)
    check_range(args.replan_lead, '--replan-lead', low=0)
    check_range(args.max_episode_steps, '--max-episode-steps', low=1)
    check_range(args.real_time_factor, '--real-time-factor', low=0.01, high=1.0)
    check_range(args.emulated_latency_ms, '--emulated-latency-ms', low=0.0, high=10000.0)
    if args.emulated_latency_ms and args.mode != 'realtime':
        raise CommandError('--emulated-latency-ms needs the realtime bridge: a lockstep bridge '
                           'stops its clock until the chunk arrives (use --mode realtime)')
    if args.real_time_factor != 1.0 and args.mode != 'realtime':
        raise CommandError('--real-time-factor paces the realtime bridge; lockstep has no pace '
                           '(leave it at 1 or use --mode realtime)')
    check_model_dir(args.model, pruners=True)
    check_task(args.task)
    for path, option in ((args.params_file, '--params-file'),
                         (args.bridge_params_file, '--bridge-params-file')):
        if path and not os.path.isfile(path):
            raise CommandError(f'{option} {path!r} does not exist; pass a parameter file such '
                               f'as config/policy.yaml, or leave it out for the default')


def _load_params(path: str, name: str) -> dict:
    from sparse_policy_node.ros.launch_args import package_share_dir
    with open(path or os.path.join(package_share_dir(), 'config', name)) as f:
        return yaml.safe_load(f)


def write_params(args, directory: str):
    """Write the policy and bridge parameter files: the base files with the bench's changes.

    Returns:
        (policy file, bridge file, bridge control rate in Hz).
    """
    policy = _load_params(args.params_file, 'policy.yaml')
    bridge = _load_params(args.bridge_params_file, 'sim_bridge.yaml')
    policy['/**']['ros__parameters']['replan_lead_steps'] = args.replan_lead
    policy['/**']['ros__parameters']['execution.emulated_latency_s'] = \
        args.emulated_latency_ms / 1000.0
    if args.execution_mode:
        policy['/**']['ros__parameters']['execution.mode'] = args.execution_mode
    bridge['/**']['ros__parameters']['max_episode_steps'] = args.max_episode_steps
    bridge['/**']['ros__parameters']['real_time_factor'] = args.real_time_factor
    paths = []
    for name, data in (('policy.yaml', policy), ('sim_bridge.yaml', bridge)):
        paths.append(os.path.join(directory, name))
        with open(paths[-1], 'w') as f:
            yaml.safe_dump(data, f)
    rate_hz = float(bridge['/**']['ros__parameters'].get('control_rate_hz', 20.0))
    return paths[0], paths[1], rate_hz


def run_variant(args, variant: str, directory: str, policy_file: str, bridge_file: str) -> dict:
    """Run one bring-up and return its row (policy node and bridge summaries combined)."""
    os.makedirs(directory, exist_ok=True)
    tokens = ['sim:=robosuite', f'task:={args.task}', f'model:={args.model}',
              f'sparsity:={variant}', f'episodes:={args.episodes}', f'seed:={args.seed}',
              f'lockstep:={"true" if args.mode == "lockstep" else "false"}',
              f'params_file:={policy_file}', f'bridge_params_file:={bridge_file}',
              f'summary_dir:={directory}', 'log_level:=warn']
    if args.steps is not None:
        tokens.append(f'steps:={args.steps}')
    if args.device:
        tokens.append(f'device:={args.device}')
    cmd = [sys.executable, '-m', 'sparse_policy_node.cli', 'launch', *tokens]
    print(f'[bench-node] {variant}: {" ".join(cmd)}', file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    summaries = {}
    for name in ('policy_node', 'sim_bridge'):
        try:
            with open(os.path.join(directory, f'{name}.json')) as f:
                summaries[name] = json.load(f)
        except (OSError, ValueError):
            summaries[name] = {}
    if proc.returncode != 0 or not all(summaries.values()):
        raise SystemExit(f'bench-node: the {variant} bring-up failed (exit {proc.returncode}); '
                         f'its output is above')
    row = make_row(variant, summaries['policy_node'], summaries['sim_bridge'])
    row['samples_ms'] = summaries['policy_node'].get('samples', {}).get(
        'steady_obs_to_chunk_ms', [])
    return row


def make_row(variant: str, policy: dict, bridge: dict) -> dict:
    """Combine the two node summaries of one run into a result row."""
    nan = float('nan')
    steps = sum(r['length'] for r in bridge.get('results', []))
    row = {
        'variant': variant,
        'success': f'{bridge.get("successes", 0)}/{bridge.get("episodes", 0)}',
        'success_rate': bridge.get('success_rate', nan),
        'chunks': policy.get('chunks', 0),
        'dense_chunks': policy.get('dense_chunks', 0),
        'obs_to_chunk_p50_ms': policy.get('steady_obs_to_chunk_p50_ms', nan),
        'obs_to_chunk_p99_ms': policy.get('steady_obs_to_chunk_p99_ms', nan),
        'all_chunks_p99_ms': policy.get('obs_to_chunk_p99_ms', nan),
        'stamp_to_chunk_p50_ms': policy.get('stamp_to_chunk_p50_ms', nan),
        'stamp_to_chunk_p90_ms': policy.get('stamp_to_chunk_p90_ms', nan),
        'stamp_to_chunk_p99_ms': policy.get('stamp_to_chunk_p99_ms', nan),
        'latency_p50_ms': policy.get('latency_p50_ms', nan),
        'latency_p99_ms': policy.get('latency_p99_ms', nan),
        'chunk_rate_hz': policy.get('chunk_rate_hz', nan),
        'realized_sparsity': policy.get('realized_sparsity', nan),
        'frames_encoded_in_chunks': policy.get('frames_encoded_in_chunks', 0),
        'underruns': bridge.get('underruns', 0),
        'startup_underruns': bridge.get('startup_underruns', 0),
        'underrun_share': bridge.get('underruns', 0) / steps if steps else nan,
        'sim_steps': steps,
        'steps_per_wall_s': bridge.get('steps_per_wall_s', nan),
    }
    arrivals = bridge.get('arrival_delay_steps') or {}
    row['arrival_delay_steps'] = arrivals
    delays = [int(d) for d, n in arrivals.items() for _ in range(n)]
    row['arrival_delay_p50_steps'] = float(np.percentile(delays, 50)) if delays else nan
    row['arrival_delay_p90_steps'] = float(np.percentile(delays, 90)) if delays else nan
    prefix = 'rtc_delay_steps_'  # the d each rtc chunk pinned, counted by the node
    row['rtc_delay_steps'] = {k[len(prefix):]: v for k, v in policy.items()
                              if k.startswith(prefix)}
    smooth = bridge.get('smoothness') or {}
    for key in ('d2a_boundary_mean', 'd2a_within_mean', 'da_boundary_mean', 'da_within_mean'):
        row[key] = nan if smooth.get(key) is None else smooth[key]
    row['jerk_boundary_vs_within'] = row['d2a_boundary_mean'] / row['d2a_within_mean'] \
        if row['d2a_within_mean'] else nan
    return row


def add_ratios(rows: list, control_period_ms: float) -> None:
    """Add ratios against the first dense row and the keep-up verdict, in place."""
    reference = next((r for r in rows if r['variant'] == 'off'), None)
    for row in rows:
        row['obs_to_chunk_p99_within_control_period'] = (
            row['obs_to_chunk_p99_ms'] <= control_period_ms)
        if reference is not None:
            for key in ('obs_to_chunk_p50_ms', 'obs_to_chunk_p99_ms'):
                row[f'{key[:-3]}_vs_dense'] = round(reference[key] / row[key], 2)


def plot_latency_cdf(rows: list, path: str, control_period_ms: float, title: str) -> None:
    """Save a PNG: the distribution (CDF) of observation-to-chunk latency per variant.

    The first, dense chunk of each episode is left out, as in the table.
    """
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for row in rows:
        values = np.sort(np.asarray(row['samples_ms'], dtype=float))
        if values.size:
            ax.step(values, np.arange(1, values.size + 1) / values.size, where='post',
                    label=f'{row["variant"]} (p50 {np.percentile(values, 50):.0f} ms, '
                          f'p99 {np.percentile(values, 99):.0f} ms)')
    ax.axvline(control_period_ms, color='0.5', linestyle='--', linewidth=1)
    ax.text(control_period_ms, 0.02, ' one control period', color='0.4', fontsize=8)
    ax.set_xscale('log')
    ticks = [t for t in (10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000)
             if any(row['samples_ms'] and min(row['samples_ms']) / 1.5 <= t
                    <= max(row['samples_ms']) * 1.5 for row in rows) or t == control_period_ms]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel('observation-to-chunk latency (ms, log scale)')
    ax.set_ylabel('share of chunks')
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc='lower right')
    ax.grid(True, which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list) -> str:
    """Render the rows as a fixed-width table."""
    cells = [[fmt.format(row[key]) for key, fmt in COLUMNS] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) for i, (key, _) in enumerate(COLUMNS)]
    lines = ['  '.join(key.ljust(w) for (key, _), w in zip(COLUMNS, widths))]
    lines += ['  '.join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return '\n'.join(lines)


def run(args) -> int:
    """Run every variant, then print the table (or JSON)."""
    check_args(args)
    args.model = os.path.abspath(args.model)
    out = args.out or tempfile.mkdtemp(prefix='sparse_policy_bench_node_')
    os.makedirs(out, exist_ok=True)
    try:
        policy_file, bridge_file, rate_hz = write_params(args, out)
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise CommandError(f'cannot read a parameter file ({exc!r}); pass --params-file / '
                           f'--bridge-params-file in the layout of config/*.yaml') from exc
    rows = [run_variant(args, v, os.path.join(out, v.replace('.', '_')), policy_file,
                        bridge_file) for v in args.variants]
    add_ratios(rows, control_period_ms=1e3 / rate_hz)
    plot = os.path.join(out, 'bench_node.png')
    plot_latency_cdf(rows, plot, 1e3 / rate_hz,
                     f'model {os.path.basename(args.model)}, task {args.task}, {args.mode}'
                     f'{f", replan lead {args.replan_lead}" if args.replan_lead else ""}, '
                     f'{args.episodes} episodes per variant')
    result = {'model': args.model, 'task': args.task, 'mode': args.mode, 'plot': plot,
              'device': args.device or 'params file',
              'replan_lead_steps': args.replan_lead,
              'episodes': args.episodes, 'seed': args.seed, 'cpu_count': os.cpu_count(),
              'rows': rows, 'summaries': out}
    with open(os.path.join(out, 'bench_node.json'), 'w') as f:
        json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_table(rows))
    for row in rows:
        if 'obs_to_chunk_p99_vs_dense' in row and row['variant'] != 'off':
            print(f'{row["variant"]}: observation-to-chunk p50 '
                  f'x{row["obs_to_chunk_p50_vs_dense"]}, p99 '
                  f'x{row["obs_to_chunk_p99_vs_dense"]} faster than dense')
    print(f'summaries: {out}; latency plot: {plot}')
    return 0
