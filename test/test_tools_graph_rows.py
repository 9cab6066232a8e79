"""The bench part of scripts/gpu_check.sh, small on the CPU (tools/graph_rows.py + bench)."""

import json
import os
import shlex
import subprocess
import sys

from sparse_policy_node.tools.graph_rows import bench_args
from sparse_policy_node.tools.graph_rows import ROWS
from sparse_policy_node.tools.graph_rows import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name, graph, dense, sparse, path='whole_chunk_graph'):
    return json.dumps({'tag': name, 'graph': graph, 'device': 'gpu', 'dense_ms': dense,
                       'sparse_ms': sparse, 'realized_sparsity': 0.9,
                       'paths': {'dense': 'dense_graph',
                                 'sparse': path if graph == 'whole' else 'step_graphs'}})


def test_every_issue_row_runs_in_both_forms():
    lines = bench_args()
    assert len(lines) == 2 * len(ROWS) == 10
    for name, _ in ROWS:
        assert sum(f'--tag {name} ' in line for line in lines) == 2
    assert all('--device cuda' in line for line in lines)
    assert all('--device cpu' in line for line in bench_args(dry_run=True))


def test_verdict_follows_the_issue_targets():
    lines = [_run('lift-ddim5', 'whole', 3.0, 2.0), _run('lift-ddim5', 'step', 3.2, 4.0),
             _run('paper-ddpm100', 'whole', 59.0, 7.5), _run('paper-ddpm100', 'step', 59, 23)]
    report = summarize(lines)
    row = report['rows']['lift-ddim5']
    assert row['dense_ms'] == 3.2 and row['whole_vs_dense'] == 0.625
    assert row['step_vs_dense'] == 1.25
    assert report['verdict'] == {'done': True, 'problems': []}
    slow = summarize(lines[:2] + [_run('paper-ddpm100', 'whole', 59.0, 9.0)])
    assert slow['verdict']['problems'] == ['paper-ddpm100: 9.0 ms > 8.0 ms']
    fell_back = summarize([_run('lift-ddim10', 'whole', 4.0, 2.0, path='step_graphs')])
    assert fell_back['verdict']['problems'] == ['lift-ddim10: the whole-chunk form ran '
                                                'step_graphs']
    assert not summarize([_run('x', 'step', 4.0, 2.0)])['verdict']['done']


def test_the_dry_run_rows_bench_and_summarize_on_the_cpu():
    env = dict(os.environ, PYTHONPATH=ROOT)
    lines = []
    for args in bench_args(dry_run=True)[:2]:  # the first row, both forms
        out = subprocess.run([sys.executable, '-m', 'sparse_policy_node.cli', 'bench',
                              *shlex.split(args)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300, check=True)
        lines.append(out.stdout.strip().splitlines()[-1])
    report = summarize(lines)
    (name, row), = report['rows'].items()
    assert name == 'tiny-ddim5'
    assert row['whole_paths']['sparse'] == 'whole_chunk_graph'
    assert row['step_paths']['sparse'] == 'eager'  # no step graphs on the CPU
    assert row['whole_ms'] > 0 and row['step_ms'] > 0 and row['dense_ms'] > 0
    assert 0 < row['whole_sparsity'] <= 0.8
