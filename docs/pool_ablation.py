"""Pool the per-block reports of a blocked ``sparse-policy frontier`` run into one report.

The ablation of ``docs/ablation.md`` runs in blocks of seeds (a cut run loses one block at
most). Every block's ``frontier.json`` keeps every episode (``episodes_per_point``); this
concatenates them per point and recomputes each point's counts and means from the episodes:

    python docs/pool_ablation.py OUT.json BLOCK_DIR_OR_REPORT [...]

A report may itself be a pooled one (its ``episodes_per_point`` holds all its episodes). A
seed that appears twice for a point is an error.
"""

import json
import os
import sys

import numpy as np


def _mean(values):
    return float(np.mean(values)) if values else None


def pool(reports: list) -> dict:
    """Return one report with the episodes of ``reports`` and points recomputed from them."""
    episodes = {}
    for report in reports:
        for name, eps in report['episodes_per_point'].items():
            episodes.setdefault(name, []).extend(eps)
    points = []
    for name, eps in episodes.items():
        seeds = [e['seed'] for e in eps]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f'{name}: a seed appears twice; pool disjoint blocks')
        eps.sort(key=lambda e: e['seed'])
        wins = [e for e in eps if e['success']]
        point = {'name': name, 'wins': len(wins), 'episodes': len(eps),
                 'success': len(wins) / len(eps),
                 'steps_success': _mean([e['steps'] for e in wins]),
                 'chunk_ms': _mean([e['chunk_ms'] for e in eps])}
        sparsity = [e['realized_sparsity'] for e in eps if 'realized_sparsity' in e]
        if sparsity:
            point['realized_sparsity'] = _mean(sparsity)
        points.append(point)
    first = reports[0]
    seeds = sorted({e['seed'] for eps in episodes.values() for e in eps})
    return {'model': first['model'], 'task': first['task'], 'seeds': [seeds[0], seeds[-1]],
            'episodes': len(seeds), 'points': points, 'episodes_per_point': episodes,
            'blocks': [{'seed_start': r.get('seed_start'), 'episodes': r.get('episodes')}
                       for r in reports]}


def main(argv) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    reports = []
    for path in argv[2:]:
        path = os.path.join(path, 'frontier.json') if os.path.isdir(path) else path
        with open(path) as f:
            reports.append(json.load(f))
    pooled = pool(reports)
    with open(argv[1], 'w') as f:
        json.dump(pooled, f, indent=1)
    for p in pooled['points']:
        steps = '-' if p['steps_success'] is None else f'{p["steps_success"]:.1f}'
        print(f'{p["name"]:<14} {p["wins"]}/{p["episodes"]}  steps/success {steps}  '
              f'chunk {p["chunk_ms"]:.1f} ms  sparsity {p.get("realized_sparsity", 0):.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
