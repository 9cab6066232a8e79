"""``sparse-policy train-efficiency``: success at matched sparsity against training data."""

import json

import pytest
from sparse_policy_node.training.efficiency import draw_episodes
from sparse_policy_node.training.efficiency import episode_summary
from sparse_policy_node.training.efficiency import epochs_for_budget
from test_training_rollouts import write_tiny_rollouts


def test_draws_are_seeded_subsets():
    assert draw_episodes(10, 4, 0) == draw_episodes(10, 4, 0)
    assert draw_episodes(10, 4, 0) != draw_episodes(10, 4, 1)
    assert draw_episodes(3, 3, 5) == [0, 1, 2]
    picked = draw_episodes(64, 16, 2)
    assert len(set(picked)) == 16 and all(0 <= i < 64 for i in picked)


def test_summary_counts_successes_and_their_length():
    episodes = [{'success': True, 'steps': 40, 'realized_sparsity': 0.9},
                {'success': False, 'steps': 400, 'realized_sparsity': 0.95},
                {'success': True, 'steps': 60, 'realized_sparsity': 0.92}]
    out = episode_summary(episodes)
    assert out['wins'] == 2 and out['episodes'] == 3
    assert out['success'] == pytest.approx(2 / 3) and out['steps_success'] == 50.0
    assert out['realized_sparsity'] == pytest.approx(0.9233, abs=1e-4)
    assert episode_summary([{'success': False, 'steps': 9}])['steps_success'] is None


def test_too_many_trajectories_is_one_line(tiny_policy, tmp_path, capsys):
    from sparse_policy_node.cli import main
    model_dir, path = str(tmp_path / 'model'), str(tmp_path / 'rollouts.hdf5')
    write_tiny_rollouts(tiny_policy, model_dir, path)
    code = main(['train-efficiency', '--model', model_dir, '--rollouts', path,
                 '--trajectories', '1', '4'])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'holds 3 episodes' in err


def test_a_frame_budget_gives_few_trajectories_more_epochs():
    assert epochs_for_budget(25, 400) == 16      # one Can episode of 25 chunks
    assert epochs_for_budget(1600, 400) == 1     # never less than one pass
    assert epochs_for_budget(100, 400) == 4
    assert epochs_for_budget(300, 400) == 1      # nearest: 300 frames, not 600


def test_rollout_lengths_are_read_without_loading(tiny_policy, tmp_path):
    from sparse_policy_node.training.rollouts import rollout_lengths
    path = str(tmp_path / 'rollouts.hdf5')
    write_tiny_rollouts(tiny_policy, str(tmp_path / 'model'), path, lengths=(3, 2, 4))
    assert rollout_lengths(path) == [3, 2, 4]


def test_negative_frame_budget_is_one_line(tiny_policy, tmp_path, capsys):
    from sparse_policy_node.cli import main
    model_dir, path = str(tmp_path / 'model'), str(tmp_path / 'rollouts.hdf5')
    write_tiny_rollouts(tiny_policy, model_dir, path)
    assert main(['train-efficiency', '--model', model_dir, '--rollouts', path,
                 '--trajectories', '1', '--train-frames', '-5']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '--train-frames' in err


@pytest.mark.sim
def test_command_trains_evaluates_and_plots_every_point(tiny_policy, tmp_path, capsys):
    pytest.importorskip('robosuite')
    from sparse_policy_node.cli import main
    model_dir, path = str(tmp_path / 'model'), str(tmp_path / 'rollouts.hdf5')
    write_tiny_rollouts(tiny_policy, model_dir, path)
    out = tmp_path / 'eff'
    code = main(['train-efficiency', '--model', model_dir, '--rollouts', path,
                 '--trajectories', '1', '2', '--train-seeds', '0', '1', '--epochs', '1',
                 '--target-sparsity', '0.5', '--episodes', '1', '--seed-start', '3',
                 '--max-steps', '12', '--out', str(out)])
    assert code == 0
    report = json.loads((out / 'efficiency.json').read_text())
    assert [(p['trajectories'], p['train_seed']) for p in report['points']] == [
        (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [len(p['train_episodes']) for p in report['points']] == [1, 1, 2, 2]
    assert report['dense']['episodes'] == 1 and report['schedule'] == 'ddpm-10'
    for point in report['points']:  # chunks after the first (dense by rule) run the dial
        assert point['realized_sparsity'] == pytest.approx(0.5, abs=0.06)
        assert point['per_episode'][0]['chunks'] == 3
        run = out / f'n{point["trajectories"]}_seed{point["train_seed"]}'
        last = json.loads((run / 'log.jsonl').read_text().splitlines()[-1])   # the evaluated
        assert (point['train_fidelity'], point['train_sparsity']) == (
            last['train_fidelity'], last['train_sparsity'])
    assert (out / 'efficiency.png').stat().st_size > 0
    assert (out / 'n2_seed1' / 'last' / 'pruner.json').is_file()
    assert json.loads(capsys.readouterr().out.splitlines()[0])['dense'] == 0.0
    # --resume keeps the dense episodes and the finished points, and adds the new ones.
    assert main(['train-efficiency', '--model', model_dir, '--rollouts', path,
                 '--trajectories', '1', '3', '--train-seeds', '1', '--epochs', '1',
                 '--target-sparsity', '0.5', '--episodes', '1', '--seed-start', '3',
                 '--max-steps', '12', '--out', str(out), '--resume']) == 0
    resumed = json.loads((out / 'efficiency.json').read_text())
    assert resumed['points'][:4] == report['points'] and resumed['dense'] == report['dense']
    assert [(p['trajectories'], p['train_seed']) for p in resumed['points'][4:]] == [(3, 1)]
    # A run cut off while it evaluated a point: --resume evaluates the trained pruner again
    # and does not train it again.
    cut = dict(resumed, points=resumed['points'][:4])
    (out / 'efficiency.json').write_text(json.dumps(cut))
    log = (out / 'n3_seed1' / 'log.jsonl').read_text()
    (out / 'n3_seed1' / 'log.jsonl').write_text(log)     # a retraining would rewrite it
    mtime = (out / 'n3_seed1' / 'log.jsonl').stat().st_mtime_ns
    capsys.readouterr()
    assert main(['train-efficiency', '--model', model_dir, '--rollouts', path,
                 '--trajectories', '3', '--train-seeds', '1', '--epochs', '1',
                 '--target-sparsity', '0.5', '--episodes', '1', '--seed-start', '3',
                 '--max-steps', '12', '--out', str(out), '--resume']) == 0
    assert 'training finished' in capsys.readouterr().err
    assert (out / 'n3_seed1' / 'log.jsonl').stat().st_mtime_ns == mtime
    again = json.loads((out / 'efficiency.json').read_text())['points'][4]
    kept = ('train_fidelity', 'train_sparsity', 'train_episodes')
    assert {k: again[k] for k in kept} == {k: resumed['points'][4][k] for k in kept}
    assert main(['train-efficiency', '--model', model_dir, '--rollouts', path,
                 '--trajectories', '1', '--epochs', '2', '--target-sparsity', '0.5',
                 '--episodes', '1', '--seed-start', '3', '--max-steps', '12',
                 '--out', str(out), '--resume']) == 2
    assert 'other settings' in capsys.readouterr().err
    # --train-frames: each point trains for the epochs nearest to the budget.
    budget = tmp_path / 'budget'
    assert main(['train-efficiency', '--model', model_dir, '--rollouts', path,
                 '--trajectories', '1', '3', '--train-frames', '9', '--target-sparsity', '0.5',
                 '--episodes', '1', '--seed-start', '3', '--max-steps', '12',
                 '--out', str(budget)]) == 0
    report = json.loads((budget / 'efficiency.json').read_text())
    lengths = [3, 2, 4]
    assert report['train_frames'] == 9
    for point in report['points']:
        frames = sum(lengths[i] for i in point['train_episodes'])
        assert point['epochs'] == epochs_for_budget(frames, 9)
        assert point['train_frames'] == frames * point['epochs']
        run = budget / f'n{point["trajectories"]}_seed0'
        assert len((run / 'log.jsonl').read_text().splitlines()) == point['epochs']
    assert report['points'][1]['epochs'] == 1            # 9 frames: one pass


def test_plot_with_no_successful_point(tmp_path):
    from sparse_policy_node.training.efficiency import plot_efficiency
    report = {'task': 'lift', 'schedule': 'ddpm-100', 'episodes': 10, 'seed_start': 1,
              'epochs': 10, 'target_sparsity': 0.93,
              'dense': {'success': 1.0, 'steps_success': 50.5},
              'points': [{'trajectories': 1, 'success': 0.0, 'steps_success': None}]}
    plot_efficiency(report, str(tmp_path / 'plot.png'))
    assert (tmp_path / 'plot.png').stat().st_size > 0


def test_resume_takes_a_report_older_than_a_setting_and_names_what_differs(tmp_path):
    from sparse_policy_node.tools.args import CommandError
    from sparse_policy_node.training.efficiency import resumed
    old = {'model': 'm', 'epochs': 3, 'points': [{'trajectories': 1}]}  # no train_frames yet
    (tmp_path / 'efficiency.json').write_text(json.dumps(old))
    new = {'model': 'm', 'epochs': 3, 'train_frames': 0, 'points': []}
    assert resumed(new, str(tmp_path))['points'] == old['points']
    with pytest.raises(CommandError, match=r'\(train_frames\)'):
        resumed(dict(new, train_frames=800), str(tmp_path))
    with pytest.raises(CommandError, match=r'\(epochs\)'):
        resumed(dict(new, epochs=4), str(tmp_path))


def test_a_finished_training_is_found_only_when_it_matches(tmp_path):
    from dataclasses import asdict
    from dataclasses import replace
    from sparse_policy_node.training.efficiency import finished_training
    from sparse_policy_node.training.pruner_training import PrunerTrainConfig
    cfg = PrunerTrainConfig(target_sparsity=0.93, epochs=3, batch_episodes=1, val_episodes=0)
    rollouts = str(tmp_path / 'r.hdf5')
    run = tmp_path / 'run'
    (run / 'last').mkdir(parents=True)
    (run / 'run.json').write_text(json.dumps({'train_config': asdict(cfg),
                                              'rollouts': rollouts}))
    rows = [{'epoch': e, 'minutes': 0.5 * (e + 1), 'train_fidelity': 0.1} for e in range(3)]
    (run / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert finished_training(str(run), cfg, rollouts) is None          # no pruner saved yet
    (run / 'last' / 'pruner.safetensors').write_bytes(b'x')
    assert finished_training(str(run), cfg, rollouts) == {'minutes': 1.5, 'last': rows[-1]}
    assert finished_training(str(run), replace(cfg, epochs=4), rollouts) is None  # cut short
    assert finished_training(str(run), replace(cfg, seed=7), rollouts) is None
    assert finished_training(str(run), cfg, str(tmp_path / 'other.hdf5')) is None
    assert finished_training(str(tmp_path / 'none'), cfg, rollouts) is None
    (run / 'log.jsonl').write_text('{not json')
    assert finished_training(str(run), cfg, rollouts) is None


def _report(seed, points, dense_steps=(50, None)):
    per_episode = [{'seed': 5 + i, 'success': steps is not None, 'steps': steps or 400,
                    'chunk_ms': 10.0 + seed} for i, steps in enumerate(dense_steps)]
    point = {'trajectories': 1, 'train_seed': seed, 'success': 0.5, 'wins': 1, 'episodes': 2,
             'steps_success': 60.0}
    return {'model': 'm', 'task': 'lift', 'schedule': 'ddpm-100', 'episodes': 2,
            'seed_start': 5, 'epochs': 1, 'train_frames': 800, 'target_sparsity': 0.93,
            'dense': {'success': 0.5, 'wins': 1, 'episodes': 2, 'steps_success': 50.0,
                      'per_episode': per_episode},
            'points': [dict(point, trajectories=n) for n in points]}


def test_join_keeps_every_point_and_checks_settings_and_dense_episodes():
    from sparse_policy_node.tools.args import CommandError
    from sparse_policy_node.training.efficiency import join_reports
    joined = join_reports([_report(0, [1, 4]), _report(1, [2, 1])], ['a', 'b'])
    assert [(p['trajectories'], p['train_seed']) for p in joined['points']] == [
        (1, 0), (1, 1), (2, 1), (4, 0)]
    assert joined['dense'] == _report(0, [])['dense']   # timings may differ, episodes not
    with pytest.raises(CommandError, match=r'b was made with other settings .*\(train_frames\)'):
        join_reports([_report(0, [1]), dict(_report(1, [1]), train_frames=9)], ['a', 'b'])
    with pytest.raises(CommandError, match='dense episodes of b differ'):
        join_reports([_report(0, [1]), _report(1, [1], dense_steps=(51, None))], ['a', 'b'])
    with pytest.raises(CommandError, match='b repeats the point n=1, seed 0'):
        join_reports([_report(0, [1]), _report(0, [1])], ['a', 'b'])
    no_dense = {k: v for k, v in _report(1, []).items() if k != 'dense'}
    with pytest.raises(CommandError, match='b has no dense episodes yet'):
        join_reports([_report(0, [1]), no_dense], ['a', 'b'])


def test_join_command_writes_report_and_plot_or_one_line(tmp_path, capsys):
    from sparse_policy_node.cli import main
    for seed in (0, 1):
        (tmp_path / f's{seed}').mkdir()
        (tmp_path / f's{seed}' / 'efficiency.json').write_text(
            json.dumps(_report(seed, [1, 2])))
    out = tmp_path / 'joined'
    assert main(['train-efficiency', '--join', str(tmp_path / 's0'), str(tmp_path / 's1'),
                 '--out', str(out)]) == 0
    assert len(json.loads((out / 'efficiency.json').read_text())['points']) == 4
    assert (out / 'efficiency.png').stat().st_size > 0
    capsys.readouterr()
    assert main(['train-efficiency', '--join', str(tmp_path / 's0'), str(tmp_path / 'none'),
                 '--out', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'cannot read' in err
    assert main(['train-efficiency', '--model', str(tmp_path), '--out', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '--rollouts is required' in err
