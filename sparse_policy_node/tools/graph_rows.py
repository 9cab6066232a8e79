"""The rows of issue 24's GPU check: dense whole-chunk graph vs sparse whole-chunk vs step graphs.

``scripts/gpu_check.sh`` runs ``sparse-policy bench --json`` once per (row, graph form) and
this module says which (``args``) and reads the results back (``summarize``)::

    python -m sparse_policy_node.tools.graph_rows args [--dry-run]   # one line per bench run
    python -m sparse_policy_node.tools.graph_rows summarize bench.jsonl  # JSON to stdout

Every bench run times a dense chunk (one whole-chunk graph, the same in both forms) next to
the sparse chunks of its form, on the same windows and noise, so each row gives
``sparse_whole / dense`` and ``sparse_step / dense`` from the same process as the dense time.
The issue is done when ``sparse_whole / dense <= 0.7`` on every row and ``paper`` DDPM-100 at
the dial 0.93 takes at most 8 ms (``verdict``). ``--dry-run`` swaps in the tiny preset on the
CPU (seconds), to prove the script end to end without a GPU.
"""

import argparse
import json
import sys
from typing import List

FORMS = ('whole', 'step')
# name, bench arguments (the learned gates of the shipped Lift model on its trained schedules,
# the dial 0.93 elsewhere, as in docs/gpu.md's earlier rows)
ROWS = (
    ('lift-ddim5', '--model models/lift --sampler ddim --steps 5 --gates pruner --sparsity -1'),
    ('lift-ddim10', '--model models/lift --sampler ddim --steps 10 --gates pruner --sparsity -1'),
    ('lift-ddpm100', '--model models/lift --sampler ddpm --steps 100 --gates pruner '
                     '--sparsity 0.93'),
    ('paper-ddpm100', "--model '' --preset paper --sampler ddpm --steps 100 --gates pruner "
                      '--sparsity 0.93'),
    ('paper-ddim10', "--model '' --preset paper --sampler ddim --steps 10 --gates pruner "
                     '--sparsity 0.93'),
)
DRY_ROWS = (
    ('tiny-ddim5', "--model '' --preset tiny --sampler ddim --steps 5 --gates pruner "
                   '--sparsity 0.8'),
    ('tiny-ddpm10', "--model '' --preset tiny --sampler ddpm --steps 10 --gates pruner "
                    '--sparsity 0.8'),
)
GPU_TIMING = '--device cuda --reps 6 --warmup 1'
DRY_TIMING = '--device cpu --reps 2 --warmup 1 --threads 1'
RATIO_TARGET = 0.7
PAPER_DDPM100_MS = 8.0


def bench_args(dry_run: bool = False) -> List[str]:
    """One ``sparse-policy bench`` argument string per (row, form), rows in priority order."""
    rows, timing = (DRY_ROWS, DRY_TIMING) if dry_run else (ROWS, GPU_TIMING)
    return [f'--json --graph {form} --tag {name} {args} {timing}'
            for name, args in rows for form in FORMS]


def summarize(lines: List[str]) -> dict:
    """Rows of ``bench --json`` objects (tagged) -> the table of the issue and its verdict.

    Returns:
        ``rows``: per row name, ``dense_ms`` (whole-chunk dense graph, median of both runs),
        ``whole_ms`` / ``step_ms`` (sparse), their ratios to dense, the paths each engine
        really ran (a whole-chunk form that fell back to step graphs shows it), the realized
        sparsity; ``verdict``: whether every row met the targets, and why not.
    """
    runs = [json.loads(line) for line in lines if line.strip().startswith('{')]
    rows, problems = {}, []
    for run in runs:
        row = rows.setdefault(run['tag'], {'device': run['device'], 'dense_ms': []})
        row['dense_ms'].append(run['dense_ms'])
        row[f'{run["graph"]}_ms'] = run['sparse_ms']
        row[f'{run["graph"]}_paths'] = run.get('paths')
        row[f'{run["graph"]}_sparsity'] = run['realized_sparsity']
    for name, row in rows.items():
        dense = sorted(row['dense_ms'])[len(row['dense_ms']) // 2]
        row['dense_ms'] = dense
        for form in FORMS:
            if f'{form}_ms' in row:
                row[f'{form}_vs_dense'] = round(row[f'{form}_ms'] / dense, 3)
        whole = row.get('whole_vs_dense')
        if whole is None:
            problems.append(f'{name}: no whole-chunk run')
        elif whole > RATIO_TARGET:
            problems.append(f'{name}: sparse whole-chunk / dense {whole} > {RATIO_TARGET}')
        paths = row.get('whole_paths') or {}
        if whole is not None and paths.get('sparse') != 'whole_chunk_graph':
            problems.append(f'{name}: the whole-chunk form ran {paths.get("sparse")}')
    paper = rows.get('paper-ddpm100')
    if paper is not None and paper.get('whole_ms', float('inf')) > PAPER_DDPM100_MS:
        problems.append(f'paper-ddpm100: {paper.get("whole_ms")} ms > {PAPER_DDPM100_MS} ms')
    return {'rows': rows, 'verdict': {'done': bool(rows) and not problems,
                                      'problems': problems}}


def main(argv=None) -> int:
    """Print the bench arguments, or summarize a bench.jsonl."""
    parser = argparse.ArgumentParser(prog='graph_rows', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    listing = sub.add_parser('args', help='one bench argument line per (row, form)')
    listing.add_argument('--dry-run', action='store_true', help='tiny preset on the CPU')
    report = sub.add_parser('summarize', help='bench.jsonl -> summary JSON on stdout')
    report.add_argument('path')
    args = parser.parse_args(argv)
    if args.command == 'args':
        print('\n'.join(bench_args(args.dry_run)))
        return 0
    with open(args.path) as f:
        print(json.dumps(summarize(f.readlines()), indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
