"""``sparse-policy eval`` on short real episodes, and plugging in a policy-like object."""

import json

import pytest
from sparse_policy_node.core.checkpoint import save_policy
import torch

pytestmark = pytest.mark.sim


@pytest.fixture
def tiny_model_dir(tiny_policy, tmp_path):
    directory = str(tmp_path / 'model')
    save_policy(tiny_policy, directory, {'env_args': {'task': 'lift'}})
    return directory


def test_eval_json_report_and_plot(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip('robosuite')
    from sparse_policy_node.cli import main
    out = tmp_path / 'report'
    code = main(['eval', '--model', tiny_model_dir, '--episodes', '2', '--seed-start', '7',
                 '--max-steps', '6', '--sampler', 'ddim', '--steps', '2', '--json',
                 '--out', str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report['episodes'] == 2 and report['seed_start'] == 7
    assert report['success_dense'] == 0.0  # a random tiny model does not lift in 6 steps
    assert report['sampler'] == 'ddim' and report['num_inference_steps'] == 2
    assert [e['seed'] for e in report['episodes_dense']] == [7, 8]
    assert [e['steps'] for e in report['episodes_dense']] == [6, 6]
    assert json.loads((out / 'report.json').read_text())['task'] == 'lift'
    assert (out / 'success.png').stat().st_size > 0
    assert report['runs_dense'] == 'ddim-2 dense'


def test_eval_table_names_what_each_row_runs(tiny_model_dir, capsys):
    pytest.importorskip('robosuite')
    from sparse_policy_node.cli import main
    code = main(['eval', '--model', tiny_model_dir, '--episodes', '1', '--max-steps', '2',
                 '--sampler', 'ddim', '--steps', '2', '--variants', 'dense', 'ddim-3',
                 'static-50', '--no-deviation'])
    assert code == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert 'ddim-2 dense' in rows['dense'] and 'ddim-3 dense' in rows['ddim-3']
    assert 'ddim-2 static 0.50' in rows['static-50']


class ScriptedLift:
    """A policy-like object (reset + predict_action) driven by the scripted expert."""

    def __init__(self, env):
        from sparse_policy_node.sim.experts import make_expert
        self.env, self.expert, self.resets = env, make_expert('lift', 0), 0

    def reset(self):
        self.expert.reset()
        self.resets += 1

    def predict_action(self, obs):
        assert obs['agentview_image'].shape == (1, 2, 3, 32, 32)
        return {'action': torch.as_tensor(self.expert(self.env))[None, None]}


def test_run_episode_accepts_any_policy_like_object():
    pytest.importorskip('robosuite')
    from sparse_policy_node.sim.robosuite_env import make_env
    from sparse_policy_node.training.evaluate import run_episode
    env = make_env('lift', ('agentview',), (32, 32), max_steps=150)
    policy = ScriptedLift(env)
    result = run_episode(env, policy, seed=100000, n_obs_steps=2)
    env.close()
    assert result['success'] and policy.resets == 1 and result['steps'] < 150


def test_device_and_precision_reach_every_variant():
    # eval --precision: the engine variants run the denoiser in it; dense below float32 runs
    # on the engine with sparsity off (DensePolicy has no precision knob).
    from sparse_policy_node.core.checkpoint import load_policy
    from sparse_policy_node.training.variants import DensePolicy
    from sparse_policy_node.training.variants import make_variant
    policy = load_policy('models/lift')
    for name in ('dense', 'default', 'sparse'):
        variant = make_variant(name, policy, {'model': 'models/lift', 'precision': 'bfloat16'})
        runtime = variant.engine.runtime
        assert runtime.precision == 'bfloat16', name
        assert runtime.sparsity_enabled == (name != 'dense'), name
        variant.close()
    assert isinstance(make_variant('dense', policy, {'model': 'models/lift'}), DensePolicy)
