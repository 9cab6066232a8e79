"""``sparse-policy precision``: reduced precision and graphs against float32, on CPU."""

import json

from sparse_policy_node.cli import main
from test_training_rollouts import write_tiny_rollouts


def _rows(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_recorded_windows_reproduce_the_recorded_chunks(tiny_policy, tmp_path, capsys):
    model_dir, path = str(tmp_path / 'model'), str(tmp_path / 'rollouts.hdf5')
    write_tiny_rollouts(tiny_policy, model_dir, path)
    assert main(['precision', '--model', model_dir, '--rollouts', path, '--device', 'cpu',
                 '--windows', '6', '--precisions', 'bfloat16', '--threads', '1']) == 0
    result = _rows(capsys)
    rows = {(r['mode'], r['precision']): r for r in result['rows']}
    assert set(rows) == {('dense', 'float32'), ('dense', 'bfloat16')}  # no pruner: no sparse
    ref = rows['dense', 'float32']
    assert ref['chunks'] == 6 and ref['err_max'] == 0.0
    # Same windows and recorded noise: the recorded dense chunks come back (float rounding).
    assert ref['vs_recorded_max'] < 1e-4
    low = rows['dense', 'bfloat16']
    assert low['finite'] and 0.0 < low['err_mean'] < ref['noise_spread']


def test_random_windows_with_a_preset_pruner(capsys):
    assert main(['precision', '--model', '', '--preset', 'tiny', '--device', 'cpu',
                 '--windows', '3', '--precisions', 'float16', '--sparsity', '0.5',
                 '--cuda-graphs', '--threads', '1', '--json']) == 0
    result = _rows(capsys)
    assert result['source'].startswith('random windows')
    modes = {(r['mode'], r['precision'], r['cuda_graphs']) for r in result['rows']}
    assert ('sparse', 'float16', True) in modes and len(modes) == 8
    for r in result['rows']:
        assert r['finite']
        if r['precision'] == 'float32':  # graphs are ignored on CPU: identical chunks
            assert r['err_max'] == 0.0
