"""``sparse-policy frontier`` end to end on a tiny model; pruner schedule and hash checks."""

import json
import os

import pytest
from sparse_policy_node.core.checkpoint import CheckpointError
from sparse_policy_node.core.checkpoint import load_pruners
from sparse_policy_node.core.checkpoint import policy_sha256
from sparse_policy_node.core.checkpoint import read_serving_config
from sparse_policy_node.core.checkpoint import save_policy
from sparse_policy_node.core.checkpoint import save_pruner
from sparse_policy_node.core.checkpoint import write_serving_config
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.engine import load_engine
from sparse_policy_node.core.pruner import Pruner
from sparse_policy_node.training.frontier import is_lossless
from sparse_policy_node.training.frontier import pareto
from sparse_policy_node.training.pruner_training import install_pruner
import torch


def make_pruner(policy, seed=0):
    torch.manual_seed(seed)
    pruner = Pruner(PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32),
                    policy.transformer.num_units, policy.config.transformer.n_emb)
    with torch.no_grad():
        pruner.head.bias.copy_(torch.tensor([0.0, 0.5, 0.4, 0.6]))
    return pruner


def model_with_pruners(policy, tmp_path, schedules=(('ddpm', 10), ('ddim', 4))):
    """Write a model directory with one pruner per schedule, as train-pruner installs."""
    model_dir = str(tmp_path / 'model')
    save_policy(policy, model_dir, {'env_args': {'task': 'lift'}})
    for i, (sampler, steps) in enumerate(schedules):
        run = str(tmp_path / f'run{i}')
        save_pruner(make_pruner(policy, i), run, {
            'sampler': sampler, 'num_inference_steps': steps,
            'policy_sha256': policy_sha256(model_dir)})
        install_pruner(run, model_dir)
    return model_dir


def test_one_pruner_per_schedule_is_installed_and_chosen_by_the_engine(tiny_policy, tmp_path):
    model_dir = model_with_pruners(tiny_policy, tmp_path)
    assert os.path.isfile(os.path.join(model_dir, 'pruner.json'))
    assert os.path.isfile(os.path.join(model_dir, 'pruners', 'ddim-4', 'pruner.json'))
    assert set(load_pruners(model_dir)) == {('ddpm', 10), ('ddim', 4)}
    engine = load_engine(model_dir)
    assert engine.pruner.schedule == ('ddpm', 10)
    engine.set_runtime(RuntimeConfig(sampler='ddim', num_inference_steps=4))
    assert engine.pruner.schedule == ('ddim', 4)
    engine.close()


def test_a_pruner_on_a_schedule_it_was_not_trained_for_is_refused(tiny_policy, tmp_path):
    model_dir = model_with_pruners(tiny_policy, tmp_path, schedules=(('ddpm', 10),))
    engine = load_engine(model_dir)
    with pytest.raises(ConfigError, match='no pruner trained for ddim-5.*ddpm-10'):
        engine.set_runtime(RuntimeConfig(sampler='ddim', num_inference_steps=5))
    with pytest.raises(ConfigError, match='no pruner trained for ddim-5'):
        load_engine(model_dir, runtime=RuntimeConfig(sampler='ddim', num_inference_steps=5))
    # Dense or a baseline on that schedule is fine.
    engine.set_runtime(RuntimeConfig(sampler='ddim', num_inference_steps=5,
                                     sparsity_enabled=False))
    engine.close()


def test_a_pruner_trained_for_other_weights_is_refused_at_load(tiny_policy, tmp_path):
    model_dir = model_with_pruners(tiny_policy, tmp_path, schedules=(('ddpm', 10),))
    with torch.no_grad():
        tiny_policy.transformer.head.weight.add_(0.01)  # "retrained" policy
    save_policy(tiny_policy, model_dir, {'env_args': {'task': 'lift'}})
    with pytest.raises(CheckpointError, match='trained for policy weights with sha256'):
        load_engine(model_dir)


def test_pareto_and_lossless():
    points = [{'name': 'dense', 'success': 1.0, 'chunk_ms': 100.0, 'steps_success': 50.0},
              {'name': 'fast', 'success': 0.98, 'chunk_ms': 10.0, 'steps_success': 54.0},
              {'name': 'slow-bad', 'success': 0.9, 'chunk_ms': 50.0, 'steps_success': 60.0},
              {'name': 'long', 'success': 0.96, 'chunk_ms': 8.0, 'steps_success': 70.0}]
    assert pareto(points) == ['dense', 'fast', 'long']
    dense = points[0]
    assert is_lossless(points[1], dense, 50, 1, 1.10)  # one episode lost, 8% longer
    assert not is_lossless(points[2], dense, 50, 1, 1.10)
    assert not is_lossless(points[3], dense, 50, 1, 1.10)  # 2 episodes lost, 40% longer
    assert not is_lossless(dict(points[3], success=1.0), dense, 50, 1, 1.10)  # 40% longer


@pytest.mark.sim
def test_frontier_end_to_end_installs_a_serving_default(tiny_policy, tmp_path, capsys):
    pytest.importorskip('robosuite')
    from sparse_policy_node.cli import main
    model_dir = model_with_pruners(tiny_policy, tmp_path)
    out = tmp_path / 'frontier'
    # 8 env steps with 4 actions per chunk: 2 chunks per episode, the second one gated.
    code = main(['frontier', '--model', model_dir, '--episodes', '2', '--seed-start', '11',
                 '--max-steps', '8', '--ddim-steps', '2', '--dials', '0.5',
                 '--rollout-max-age', '3', '--tolerance-episodes', '2',
                 '--max-steps-ratio', '10', '--out', str(out), '--install', '--json'])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    names = [p['name'] for p in report['points']]
    assert names == ['dense', 'ddim-2', 'sparse@ddim-4', 'dial-50@ddim-4', 'sparse@ddpm-10',
                     'dial-50@ddpm-10']
    by_name = {p['name']: p for p in report['points']}
    assert by_name['dense']['action_dev'] == 0.0
    assert by_name['dial-50@ddpm-10']['realized_sparsity'] == pytest.approx(0.5)
    assert by_name['dial-50@ddpm-10']['action_dev'] > 0.0
    # Every episode is 8 steps, so every point is "lossless" here: the fastest is chosen.
    assert all(p['lossless'] for p in report['points'])
    fastest = min(report['points'], key=lambda p: p['chunk_ms'])
    assert report['chosen'] == fastest['name'] and fastest['on_frontier']
    serving = read_serving_config(model_dir)
    assert serving['runtime'] == report['chosen_runtime']
    assert serving['chosen_by']['point'] == report['chosen']
    # The backend, precision and CUDA graphs stay the deployment's choice.
    assert not {'backend', 'precision', 'cuda_graphs'} & set(serving['runtime'])
    assert (out / 'frontier.png').stat().st_size > 1000
    table = (out / 'frontier.md').read_text().splitlines()
    assert len(table) == 2 + len(names) and f'**{report["chosen"]}**' in '\n'.join(table)
    saved = json.loads((out / 'frontier.json').read_text())
    assert len(saved['episodes_per_point']['dense']) == 2
    # The serving default is what load_engine and eval's "default" variant then use.
    engine = load_engine(model_dir)
    runtime = engine.runtime
    assert (runtime.sampler, runtime.num_inference_steps) == (
        serving['runtime']['sampler'], serving['runtime']['num_inference_steps'])
    engine.close()
    assert main(['eval', '--model', model_dir, '--episodes', '1', '--seed-start', '11',
                 '--max-steps', '8', '--variants', 'default', '--json']) == 0
    assert 'success_default' in json.loads(capsys.readouterr().out)


@pytest.mark.sim
def test_closed_loop_selection_rolls_out_best_and_last_and_installs_one(tiny_policy, tmp_path):
    pytest.importorskip('robosuite')
    from sparse_policy_node.core.config import PrunerConfig as PC
    from sparse_policy_node.training.pruner_selection import select_closed_loop
    from sparse_policy_node.training.pruner_training import PrunerTrainConfig
    from sparse_policy_node.training.pruner_training import train_pruner
    from test_training_rollouts import write_tiny_rollouts
    model_dir, path = str(tmp_path / 'model'), str(tmp_path / 'rollouts.hdf5')
    write_tiny_rollouts(tiny_policy, model_dir, path)
    run = str(tmp_path / 'run')
    cfg = PrunerTrainConfig(target_sparsity=0.7, epochs=2, batch_episodes=2, val_episodes=1,
                            warmup_steps=1, threads=1, rollout_max_age=2,
                            pruner=PC(hidden_dim=16, n_head=2, dim_feedforward=32))
    train_pruner(model_dir, path, run, cfg, progress=False)
    summary = select_closed_loop(model_dir, run, [21, 22], rollout_max_age=2, max_steps=8,
                                 progress=False)
    assert summary['chosen'] in ('best', 'last') and summary['variant'] == 'sparse@ddpm-10'
    for which in ('best', 'last'):
        row = summary['candidates'][which]
        assert 0.0 <= row['success'] <= 1.0 and row['chunk_ms'] > 0
        assert 0.0 < row['realized_sparsity'] <= 0.9
    assert json.loads(open(os.path.join(run, 'closed_loop.json')).read()) == summary
    installed = install_pruner(os.path.join(run, summary['chosen']), model_dir)
    assert load_pruners(model_dir)[('ddpm', 10)].metadata['train_config']['rollout_max_age'] == 2
    assert installed == model_dir


def test_points_per_schedule_dials_and_trained_max_age(tiny_policy, tmp_path):
    from sparse_policy_node.training.frontier import frontier_points
    from sparse_policy_node.training.frontier import parse_schedule_dials
    from sparse_policy_node.training.frontier import point_runtime
    model_dir = model_with_pruners(tiny_policy, tmp_path)
    meta_dir = os.path.join(model_dir, 'pruners', 'ddim-4')
    pruner = load_pruners(model_dir)[('ddim', 4)]
    save_pruner(pruner, meta_dir, dict(pruner.metadata, train_config={'rollout_max_age': 3}))
    points = frontier_points(model_dir, [2], [0.5], True,
                             parse_schedule_dials(['ddpm-10=0.8,0.93']), ['static-60'])
    assert points == ['dense', 'ddim-2', 'sparse@ddim-4', 'dial-50@ddim-4', 'sparse@ddpm-10',
                      'dial-80@ddpm-10', 'dial-93@ddpm-10', 'static-60']
    assert point_runtime('dial-50@ddim-4', model_dir, None)['rollout_max_age'] == 3
    assert point_runtime('dial-80@ddpm-10', model_dir, None)['rollout_max_age'] == 0
    assert point_runtime('dial-50@ddim-4', model_dir, 1)['rollout_max_age'] == 1
    dense = point_runtime('ddim-2', model_dir, None)
    assert not dense['sparsity_enabled'] and dense['num_inference_steps'] == 2
    for bad in (['ddpm-10'], ['ddpm-10=1.5'], ['ddpm-10=x']):
        with pytest.raises(ValueError, match='schedule-dials'):
            parse_schedule_dials(bad)


@pytest.mark.parametrize('serving_steps, benched', [(4, ('ddim', 4)), (2, (None, None))])
def test_bench_follows_a_dense_serving_default_only_onto_a_pruned_schedule(
        tiny_policy, tmp_path, capsys, serving_steps, benched):
    from argparse import Namespace
    from sparse_policy_node.cli import main
    from sparse_policy_node.tools.bench import apply_serving_default
    model_dir = model_with_pruners(tiny_policy, tmp_path)
    write_serving_config(model_dir, {'sparsity_enabled': False, 'gate_source': 'dense',
                                     'sampler': 'ddim', 'num_inference_steps': serving_steps},
                         {'point': f'ddim-{serving_steps}'})
    args = Namespace(model=model_dir, gates=None, sparsity=None, sampler=None, steps=None,
                     rollout_max_age=None)
    apply_serving_default(args)
    assert (args.sampler, args.steps) == benched and args.gates == 'pruner'
    # ddim-2 has no pruner: bench says so and runs on the model's own schedule (DDPM-10).
    assert main(['bench', '--model', model_dir, '--reps', '1', '--warmup', '0', '--threads',
                 '1', '--json']) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result['dense_ms'] > 0 and result['sparse_ms'] > 0
    assert ('has no pruner' in captured.err) == (benched == (None, None))
