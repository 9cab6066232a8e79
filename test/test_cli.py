"""The ``sparse-policy`` console script and the benchmark/info commands on a tiny model."""

import json
import os
import subprocess
import sys

from sparse_policy_node.cli import COMMANDS
from sparse_policy_node.cli import main

VENV_BIN = os.path.dirname(sys.executable)


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
                'gflops_dense', 'gflops_sparse_with_pruner', 'pruner_ms', 'device', 'threads'):
        assert key in result
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
