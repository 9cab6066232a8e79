"""The ``sparse-policy`` console script and the benchmark/info commands on a tiny model."""

import json
import os
import subprocess
import sys

import pytest
from sparse_policy_node.cli import command_parser
from sparse_policy_node.cli import COMMANDS
from sparse_policy_node.cli import main
import yaml

VENV_BIN = os.path.dirname(sys.executable)
LIFT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'models',
                    'lift')


def test_help_lists_every_command(capsys):
    assert main(['--help']) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    for required in ('bench', 'info', 'import-dp'):
        assert required in COMMANDS


def test_unknown_command_is_an_error(capsys):
    assert main(['frobnicate']) == 2
    assert 'unknown command' in capsys.readouterr().err


def test_console_script_is_installed():
    exe = os.path.join(VENV_BIN, 'sparse-policy')
    out = subprocess.run([exe, '--help'], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and 'bench' in out.stdout


def test_bench_json_reports_side_by_side_ratios(capsys, tmp_path):
    png = tmp_path / 'masks.png'
    assert main(['bench', '--preset', 'tiny', '--steps', '10', '--reps', '2', '--warmup', '1',
                 '--sparsity', '0.8', '--threads', '1', '--json', '--baselines',
                 '--mask-png', str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ('dense_ms', 'sparse_ms', 'speedup', 'decoder_speedup', 'realized_sparsity',
                'gflops_dense', 'gflops_sparse_with_pruner', 'pruner_ms', 'device', 'threads',
                'sparse_stream_ms', 'sparse_prepared_ms', 'dense_prepared_ms',
                'speedup_prepared', 'frame_encode_ms'):
        assert key in result
    assert abs(result['speedup_prepared'] - result['dense_prepared_ms']
               / result['sparse_prepared_ms']) < 0.05
    assert result['realized_sparsity'] == 0.8
    # Ratios come from unrounded medians; the printed ms are rounded to 0.01.
    assert abs(result['speedup'] - result['dense_ms'] / result['sparse_ms']) < 0.05
    assert result['gflops_sparse_with_pruner'] > result['gflops_sparse']
    assert png.stat().st_size > 1000
    names = [row['name'] for row in result['baselines']]
    assert names[:2] == ['dense DDIM-16', 'dense DDIM-10']
    static = next(r for r in result['baselines'] if r['name'].startswith('static'))
    assert abs(static['realized_sparsity'] - 0.8) <= 0.1


def test_info_runs_a_finite_chunk(capsys):
    assert main(['info', '--preset', 'tiny', '--threads', '1', '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['action_finite'] and info['units'] == 6


def test_bench_node_rows_combine_both_summaries_and_compare_to_dense():
    from sparse_policy_node.tools import bench_node
    bridge = {'episodes': 2, 'successes': 1, 'success_rate': 0.5, 'underruns': 3,
              'startup_underruns': 10, 'results': [{'length': 50}, {'length': 50}]}
    sparse = bench_node.make_row('learned', {'chunks': 9, 'steady_obs_to_chunk_p50_ms': 30.0,
                                             'steady_obs_to_chunk_p99_ms': 40.0,
                                             'obs_to_chunk_p99_ms': 250.0}, bridge)
    dense = bench_node.make_row('off', {'chunks': 9, 'steady_obs_to_chunk_p50_ms': 240.0,
                                        'steady_obs_to_chunk_p99_ms': 300.0}, bridge)
    assert sparse['underrun_share'] == 0.03 and sparse['success'] == '1/2'
    rows = [sparse, dense]
    bench_node.add_ratios(rows, control_period_ms=50.0)
    assert sparse['obs_to_chunk_p50_vs_dense'] == 8.0
    assert sparse['obs_to_chunk_p99_vs_dense'] == 7.5
    assert sparse['obs_to_chunk_p99_within_control_period']
    assert not dense['obs_to_chunk_p99_within_control_period']
    table = bench_node.format_table(rows).splitlines()
    assert len(table) == 3 and table[1].startswith('learned') and '250.0' in table[1]


def test_bench_node_plots_the_latency_distribution_per_variant(tmp_path):
    from sparse_policy_node.tools import bench_node
    rows = [{'variant': 'learned', 'samples_ms': [30.0, 35.0, 41.0]},
            {'variant': 'off', 'samples_ms': [240.0, 260.0]}, {'variant': 'x', 'samples_ms': []}]
    path = tmp_path / 'cdf.png'
    bench_node.plot_latency_cdf(rows, str(path), 50.0, 'test')
    assert path.stat().st_size > 1000


def test_bench_node_refuses_a_missing_model(capsys):
    assert main(['bench-node', '--model', '/does/not/exist']) == 2
    assert 'does not exist' in capsys.readouterr().err


def test_bench_node_refuses_a_pace_without_the_realtime_bridge(capsys):
    assert main(['bench-node', '--mode', 'lockstep', '--real-time-factor', '0.5']) == 2
    assert 'lockstep has no pace' in capsys.readouterr().err
    assert main(['bench-node', '--real-time-factor', '0']) == 2
    assert '--real-time-factor must be in [0.01, 1.0], got 0.0' in capsys.readouterr().err
    assert main(['bench-node', '--mode', 'lockstep', '--emulated-latency-ms', '200']) == 2
    assert 'needs the realtime bridge' in capsys.readouterr().err


def test_bench_node_writes_the_execution_mode_and_the_pace(tmp_path):
    from sparse_policy_node.tools import bench_node
    args = command_parser('bench-node').parse_args(
        ['--execution-mode', 'rtc', '--real-time-factor', '0.5', '--emulated-latency-ms', '200'])
    policy_file, bridge_file, rate_hz = bench_node.write_params(args, str(tmp_path))
    with open(policy_file) as f:
        values = yaml.safe_load(f)['/**']['ros__parameters']
    assert values['execution.mode'] == 'rtc' and values['execution.emulated_latency_s'] == 0.2
    with open(bridge_file) as f:
        assert yaml.safe_load(f)['/**']['ros__parameters']['real_time_factor'] == 0.5
    assert rate_hz == 20.0


def test_every_command_help_shows_defaults_and_an_example(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, '--help'])
        assert exit_info.value.code == 0, name
        text = capsys.readouterr().out
        assert 'default' in text, name
        assert 'example:' in text and f'sparse-policy {name}' in text.split('example:')[1], name
    # An option without a stated default gets one, e.g. eval --episodes.
    text = command_parser('eval').format_help()
    assert 'episodes per variant' in text and '(default: 50)' in text


def test_list_options_take_spaces_or_commas():
    args = command_parser('eval').parse_args(['--variants', 'dense,sparse', 'ddim-10'])
    assert args.variants == ['dense', 'sparse', 'ddim-10']
    args = command_parser('bench-node').parse_args(['--variants', 'learned', '0.5,off'])
    assert args.variants == ['learned', '0.5', 'off']
    assert command_parser('bench-node').parse_args([]).variants == ['learned', 'off']
    args = command_parser('bench').parse_args(['--directions', 'forward', 'rollout'])
    assert args.directions == ['forward', 'rollout']
    args = command_parser('precision').parse_args(['--precisions', 'float16,bfloat16'])
    assert args.precisions == ['float16', 'bfloat16']


def test_model_is_an_option_everywhere_and_the_positional_is_deprecated(capsys):
    for name in ('info', 'bench', 'precision', 'export', 'model-card', 'eval', 'frontier',
                 'rollouts', 'train-pruner', 'masks', 'bench-node'):
        actions = {s for a in command_parser(name)._actions for s in a.option_strings}
        assert '--model' in actions, name
    assert main(['model-card', '--model', LIFT]) == 0
    card, err = capsys.readouterr()
    assert 'deprecated' not in err
    assert main(['model-card', LIFT]) == 0
    old_card, err = capsys.readouterr()
    assert old_card == card
    assert err.count('\n') == 1 and 'deprecated' in err and f'--model {LIFT}' in err


def test_replay_bag_json_out_and_its_old_spelling(tmp_path, capsys):
    from sparse_policy_node.bags.rosbag_io import BagWriter
    from sparse_policy_node.tools import replay_bag
    with BagWriter(str(tmp_path / 'bag'), {'/a': 'std_msgs/msg/String'}):
        pass
    parser = command_parser('replay-bag')
    args = parser.parse_args([str(tmp_path / 'bag'), '--json-out', 'r.json'])
    assert replay_bag.check_args(args) == {} and args.json_out == 'r.json'
    assert capsys.readouterr().err == ''
    args = parser.parse_args([str(tmp_path / 'bag'), '--json', 'old.json'])
    replay_bag.check_args(args)
    assert args.json_out == 'old.json' and 'deprecated' in capsys.readouterr().err


def test_precision_says_what_it_does_before_the_long_work(monkeypatch, capsys):
    from sparse_policy_node.tools import precision
    seen = []

    def fake_check(args):
        seen.append(capsys.readouterr().err)  # what the user saw before the work began
        return {'model': args.model, 'device': 'cpu', 'sampler': 'ddim', 'steps': 2,
                'source': 'random', 'sparse_gates': 'no pruner', 'rows': []}

    monkeypatch.setattr(precision, 'run_check', fake_check)
    assert main(['precision', '--model', '', '--preset', 'tiny', '--device', 'cpu',
                 '--windows', '3', '--json']) == 0
    assert seen[0].startswith('precision: comparing float32, float16, bfloat16')
    assert '3 windows' in seen[0]


def test_episode_options_are_checked_alike_in_every_closed_loop_command(capsys, tmp_path):
    # One check (tools/args.check_episode_arguments) for the options every command shares.
    out = str(tmp_path / 'out')
    cases = [['eval', '--steps', '0'], ['rollouts', '--out', out, '--threads', '0'],
             ['similarity', '--threads', '0'], ['frontier', '--workers', '0'],
             ['latency', '--out', out, '--threads', '0'],
             ['train-efficiency', '--rollouts', 'r.hdf5', '--max-steps', '0']]
    for argv in cases:
        assert main(argv) == 2, argv
        assert f'{argv[-2]} must be >= 1, got 0' in capsys.readouterr().err, argv
