"""Every ``sparse-policy`` subcommand reports a user's mistake in one line, before any work.

A missing or corrupt model directory (or the command's own input: a bag, a config file, a
checkpoint), and a bad value, must give exit status 2 and exactly one line on stderr,
``sparse-policy <command>: error: <what is wrong>; <what to do>``, without a traceback, and
without starting a simulator, a node or a training run (so every case here is fast).
"""

import os
import shutil

import pytest
from sparse_policy_node.cli import COMMANDS
from sparse_policy_node.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIFT = os.path.join(ROOT, 'models', 'lift')
TRAIN_YAML = os.path.join(ROOT, 'config', 'train', 'lift_small.yaml')


@pytest.fixture
def paths(tmp_path):
    """Bad inputs of every kind, by name."""
    corrupt = tmp_path / 'corrupt'  # garbage config and weights
    corrupt.mkdir()
    (corrupt / 'config.json').write_text('{"format_version": 1, "policy": ')
    (corrupt / 'model.safetensors').write_bytes(os.urandom(256))
    bad_weights = tmp_path / 'bad_weights'  # a valid config, garbage weights
    bad_weights.mkdir()
    shutil.copy(os.path.join(LIFT, 'config.json'), bad_weights / 'config.json')
    (bad_weights / 'model.safetensors').write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}')
    bag = tmp_path / 'not_a_bag'  # a directory that is not a rosbag2 bag
    bag.mkdir()
    (bag / 'metadata.yaml').write_text('rosbag2_bagfile_information: [unclosed\n')
    (tmp_path / 'junk.ckpt').write_bytes(b'just some text, not a checkpoint\n' * 8)
    (tmp_path / 'junk.safetensors').write_bytes(os.urandom(512))
    (tmp_path / 'bad.yaml').write_text('dataset: [unclosed\n')
    (tmp_path / 'junk.hdf5').write_bytes(os.urandom(512))
    (tmp_path / 'a_file').write_text('a file, not a directory\n')
    (tmp_path / 'existing').mkdir()
    return {k: str(v) for k, v in {
        'tmp': tmp_path, 'missing': tmp_path / 'nope', 'corrupt': corrupt,
        'bad_weights': bad_weights, 'bag': bag, 'junk_ckpt': tmp_path / 'junk.ckpt',
        'junk_st': tmp_path / 'junk.safetensors', 'bad_yaml': tmp_path / 'bad.yaml',
        'junk_hdf5': tmp_path / 'junk.hdf5', 'file': tmp_path / 'a_file',
        'existing': tmp_path / 'existing', 'out': tmp_path / 'out'}.items()}


def cases(p):
    """``{command: [(case, argv after the command, text the message must contain)]}``."""
    m, c, w = p['missing'], p['corrupt'], p['bad_weights']
    out_h5 = os.path.join(p['tmp'], 'out.hdf5')
    train_pruner = ['--rollouts', p['junk_hdf5'], '--out', p['out']]
    return {
        'info': [('missing', ['--model', m], 'nope'),
                 ('corrupt', ['--model', c], 'config.json'),
                 ('weights', ['--model', w], 'model.safetensors'),
                 ('bad value', ['--preset', 'huge'], 'huge')],
        'bench': [('missing', ['--model', m], 'nope'),
                  ('corrupt', ['--model', c], 'config.json'),
                  ('weights', ['--model', w], 'model.safetensors'),
                  ('bad value', ['--preset', 'tiny', '--sparsity', '1.5'], 'sparsity')],
        'precision': [('missing', ['--model', m], 'nope'),
                      ('corrupt', ['--model', c], 'config.json'),
                      ('weights', ['--model', w], 'model.safetensors'),
                      ('bad value', ['--model', LIFT, '--precisions', 'float8'], 'float8')],
        'export': [('missing', ['--model', m], 'nope'),
                   ('corrupt', ['--model', c], 'config.json'),
                   ('weights', ['--model', w], 'model.safetensors'),
                   ('bad value', ['--model', p['file']], 'a_file')],
        'import-dp': [('missing', [os.path.join(p['tmp'], 'nope.ckpt'), p['out']], 'nope'),
                      ('corrupt', [p['junk_st'], p['out']], 'safetensors'),
                      ('not a checkpoint', [p['junk_ckpt'], p['out']], 'not a checkpoint'),
                      ('bad value', [p['junk_ckpt'], p['out'], '--image-size', '84x84'],
                       'image-size')],
        'demos': [('missing', ['--out', os.path.join(p['file'], 'demos.hdf5')], 'a_file'),
                  ('bad value', ['--out', out_h5, '--num', '0'], 'num')],
        'train-policy': [('missing', ['--config', os.path.join(p['tmp'], 'nope.yaml')], 'nope'),
                         ('corrupt', ['--config', p['bad_yaml']], 'bad.yaml'),
                         ('missing dataset', ['--config', TRAIN_YAML, '--dataset', m], 'nope'),
                         ('bad value', ['--config', TRAIN_YAML, '--max-steps', '0'],
                          'max-steps')],
        'eval': [('missing', ['--model', m], 'nope'),
                 ('corrupt', ['--model', c], 'config.json'),
                 ('weights', ['--model', w], 'model.safetensors'),
                 ('no pruner', ['--model', LIFT, '--variants', 'sparse@ddim-7'], 'ddim-7'),
                 ('bad value', ['--model', LIFT, '--episodes', '0'], 'episodes')],
        'latency': [('missing', ['--model', m, '--out', p['out']], 'nope'),
                    ('corrupt', ['--model', c, '--out', p['out']], 'config.json'),
                    ('weights', ['--model', w, '--out', p['out']], 'model.safetensors'),
                    ('too slow', ['--model', LIFT, '--out', p['out'], '--latency-ms', '400'],
                     'latency-ms'),
                    ('bad value', ['--model', LIFT, '--out', p['out'], '--modes', 'ensemble'],
                     'ensemble')],
        'frontier': [('missing', ['--model', m], 'nope'),
                     ('corrupt', ['--model', c], 'config.json'),
                     ('weights', ['--model', w], 'model.safetensors'),
                     ('no pruner', ['--model', LIFT, '--extra-points', 'dial-50@ddim-7'],
                      'ddim-7'),
                     ('bad value', ['--model', LIFT, '--dials', '1.5'], 'dials')],
        'rollouts': [('missing', ['--model', m, '--out', out_h5], 'nope'),
                     ('corrupt', ['--model', c, '--out', out_h5], 'config.json'),
                     ('weights', ['--model', w, '--out', out_h5], 'model.safetensors'),
                     ('bad value', ['--model', LIFT, '--out', out_h5, '--num', '0'], 'num')],
        'train-pruner': [('missing', ['--model', m, *train_pruner], 'nope'),
                         ('corrupt', ['--model', c, *train_pruner], 'config.json'),
                         ('weights', ['--model', w, *train_pruner], 'model.safetensors'),
                         ('missing rollouts', ['--model', LIFT, '--rollouts', m, '--out',
                                               p['out']], 'nope'),
                         ('corrupt rollouts', ['--model', LIFT, *train_pruner], 'junk.hdf5'),
                         ('bad value', ['--model', LIFT, *train_pruner, '--target-sparsity',
                                        '1.5'], 'target-sparsity')],
        'train-efficiency': [('missing', ['--model', m, '--rollouts', p['junk_hdf5']], 'nope'),
                             ('corrupt', ['--model', c, '--rollouts', p['junk_hdf5']],
                              'config.json'),
                             ('missing rollouts', ['--model', LIFT, '--rollouts', m], 'nope'),
                             ('corrupt rollouts', ['--model', LIFT, '--rollouts',
                                                   p['junk_hdf5']], 'junk.hdf5'),
                             ('bad value', ['--model', LIFT, '--rollouts', p['junk_hdf5'],
                                            '--trajectories', '0'], 'trajectories')],
        'similarity': [('missing', ['--model', m], 'nope'),
                       ('corrupt', ['--model', c], 'config.json'),
                       ('weights', ['--model', w], 'model.safetensors'),
                       ('out is a file', ['--model', LIFT, '--out', p['file']], 'a_file'),
                       ('bad steps', ['--model', LIFT, '--steps', '5000'], 'steps'),
                       ('bad value', ['--model', LIFT, '--episodes', '0'], 'episodes')],
        'masks': [('missing', ['--model', m, '--rollouts', p['junk_hdf5'], '--out', out_h5],
                   'nope'),
                  ('corrupt', ['--model', c, '--rollouts', p['junk_hdf5'], '--out', out_h5],
                   'config.json'),
                  ('missing rollouts', ['--model', LIFT, '--rollouts', m, '--out', out_h5],
                   'nope'),
                  ('corrupt rollouts', ['--model', LIFT, '--rollouts', p['junk_hdf5'],
                                        '--out', out_h5], 'junk.hdf5'),
                  ('bad value', ['--model', LIFT, '--rollouts', p['junk_hdf5'], '--out',
                                 out_h5, '--max-chunks', '0'], 'max-chunks')],
        'bench-node': [('missing', ['--model', m], 'nope'),
                       ('corrupt', ['--model', c], 'config.json'),
                       ('weights', ['--model', w], 'model.safetensors'),
                       ('bad value', ['--model', LIFT, '--variants', 'learned,sometimes'],
                        'sometimes')],
        'record-bag': [('exists', [p['existing'], '--duration', '0.1'], 'exists'),
                       ('bad value', [p['out'], '--duration', '0.1', '--topic', 'nocolon'],
                        'nocolon'),
                       ('bad type', [p['out'], '--duration', '0.1', '--topic',
                                     '/a:no_msgs/msg/Nothing'], 'Nothing')],
        'replay-bag': [('missing', [m], 'nope'),
                       ('corrupt', [p['bag']], 'not_a_bag'),
                       ('missing offline', [m, '--offline'], 'nope'),
                       ('corrupt offline', [p['bag'], '--offline'], 'not_a_bag'),
                       ('bad value', [p['bag'], '--rate', '0'], 'rate')],
        'dataset-from-bag': [('missing', [m, '--out', out_h5, '--action-topic', '/a'], 'nope'),
                             ('corrupt', [p['bag'], '--out', out_h5, '--action-topic', '/a'],
                              'not_a_bag'),
                             ('bad value', [p['bag'], '--out', out_h5, '--action-topic', '/a',
                                            '--camera', 'agentview'], 'NAME=TOPIC')],
        'model-card': [('missing', ['--model', m], 'nope'),
                       ('corrupt', ['--model', c], 'config.json'),
                       ('bad value', ['--model', p['file']], 'a_file')],
        'launch': [('missing', ['sim:=none', f'model:={m}'], 'nope'),
                   ('corrupt', ['sim:=none', f'model:={c}'], 'config.json'),
                   ('weights', ['sim:=none', f'model:={w}'], 'model.safetensors'),
                   ('bad value', ['sim:=none', f'model:={LIFT}', 'sparsity:=2'], 'sparsity')],
    }


def run_cli(argv):
    """``main(argv)``'s exit status, whether returned or raised as SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


PATH_NAMES = ('tmp', 'missing', 'corrupt', 'bad_weights', 'bag', 'junk_ckpt', 'junk_st',
              'bad_yaml', 'junk_hdf5', 'file', 'existing', 'out')
CASE_IDS = [(name, index, kind) for name, entries in cases({k: k for k in PATH_NAMES}).items()
            for index, (kind, _, _) in enumerate(entries)]


def test_every_command_has_error_cases(paths):
    assert set(paths) == set(PATH_NAMES)
    table = cases(paths)
    assert set(table) == set(COMMANDS)
    for name, entries in table.items():
        kinds = [kind for kind, _, _ in entries]
        assert any(k.startswith(('missing', 'exists')) for k in kinds), name
        assert 'bad value' in kinds, name


@pytest.mark.parametrize('name, index, kind', CASE_IDS,
                         ids=[f'{n}-{k.replace(" ", "_")}' for n, _, k in CASE_IDS])
def test_mistake_is_one_line_and_exit_2(name, index, kind, paths, capsys):
    kind, argv, expected = cases(paths)[name][index]
    code = run_cli([name, *argv])
    out, err = capsys.readouterr()
    assert code == 2, f'{kind}: exit {code}\nstdout: {out}\nstderr: {err}'
    assert 'Traceback' not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f'{kind}: {err}'
    assert lines[0].startswith(f'sparse-policy {name}: error: '), lines[0]
    assert '; ' in lines[0], f'{kind}: no advice in {lines[0]!r}'
    assert expected in lines[0], f'{kind}: {expected!r} not in {lines[0]!r}'
    assert out == '', f'{kind}: {out}'
    assert not os.path.exists(paths['out']), f'{kind}: wrote {paths["out"]}'


def test_a_random_binary_is_not_taken_for_a_pickle(paths, capsys):
    assert run_cli(['import-dp', paths['junk_ckpt'], paths['out']]) == 2
    err = capsys.readouterr().err
    assert 'not a checkpoint' in err and '--trust-pickle' not in err


def test_ctrl_c_ends_quietly_with_130(monkeypatch, capsys):
    from sparse_policy_node.tools import info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, 'run', interrupted)
    assert main(['info', '--preset', 'tiny']) == 130
    out, err = capsys.readouterr()
    assert 'Traceback' not in out + err and 'KeyboardInterrupt' not in out + err


def test_a_real_bug_still_shows_its_traceback(monkeypatch):
    from sparse_policy_node.tools import info

    def buggy(args):
        return 1 // 0

    monkeypatch.setattr(info, 'run', buggy)
    with pytest.raises(ZeroDivisionError):
        main(['info', '--preset', 'tiny'])


def test_argparse_mistakes_are_one_line_too(capsys):
    assert run_cli(['eval', '--episodes', 'many']) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('sparse-policy eval: error: ')
    assert "'many'" in lines[0] and 'sparse-policy eval --help' in lines[0]
