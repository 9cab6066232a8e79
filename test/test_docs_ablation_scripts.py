"""docs/pool_ablation.py and docs/plot_ablation.py: pooled blocks and the two-task plot."""

import importlib.util
import json
import os

import pytest

DOCS = os.path.join(os.path.dirname(__file__), '..', 'docs')


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(DOCS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def block(seed_start, outcomes):
    """Return a frontier report of one block; ``outcomes`` = {point: [(success, steps), ...]}."""
    episodes = {name: [{'seed': seed_start + i, 'success': ok, 'steps': steps,
                        'chunk_ms': 10.0, 'realized_sparsity': 0.93}
                       for i, (ok, steps) in enumerate(eps)]
                for name, eps in outcomes.items()}
    return {'model': 'models/can', 'task': 'can', 'seed_start': seed_start,
            'episodes': len(next(iter(outcomes.values()))), 'episodes_per_point': episodes}


def test_pool_recomputes_points_from_every_block():
    pool = load_script('pool_ablation').pool
    pooled = pool([block(10, {'dense': [(True, 200), (True, 180)],
                              'omni@ddpm-100': [(False, 400), (True, 250)]}),
                   block(12, {'dense': [(False, 400)], 'omni@ddpm-100': [(True, 270)]})])
    points = {p['name']: p for p in pooled['points']}
    assert pooled['seeds'] == [10, 12] and pooled['episodes'] == 3
    assert points['dense']['wins'] == 2 and points['dense']['steps_success'] == 190.0
    assert points['omni@ddpm-100']['wins'] == 2
    assert points['omni@ddpm-100']['steps_success'] == 260.0
    with pytest.raises(SystemExit, match='twice'):
        pool([block(10, {'dense': [(True, 1)]}), block(10, {'dense': [(True, 1)]})])


def test_plot_matches_points_across_schedule_suffixes(tmp_path):
    pool = load_script('pool_ablation').pool
    plot = load_script('plot_ablation')
    can = pool([block(0, {'dense': [(True, 200)], 'omni@ddpm-100': [(False, 400)]})])
    lift = dict(pool([block(0, {'dense': [(True, 50)], 'omni': [(True, 60)]})]), task='lift')
    assert set(plot.points_by_variant(can)) == {'dense', 'omni'}
    paths = []
    for name, report in (('lift', lift), ('can', can)):
        paths.append(str(tmp_path / f'{name}.json'))
        with open(paths[-1], 'w') as f:
            json.dump(report, f)
    out = tmp_path / 'ablation.png'
    assert plot.main(['plot_ablation.py', str(out)] + paths) == 0
    assert out.stat().st_size > 0
    assert plot.main(['plot_ablation.py']) == 2
