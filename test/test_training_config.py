"""Training YAML files load into TrainConfig; errors name the field."""

import os

import pytest
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import small_config
from sparse_policy_node.training.config import load_train_config
from sparse_policy_node.training.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_lift_config_loads_and_builds_the_small_preset():
    cfg = load_train_config(os.path.join(ROOT, 'config', 'train', 'lift_small.yaml'))
    assert cfg.preset == 'small' and cfg.dataset == 'data/lift_demos.hdf5'
    assert cfg.policy_config() == small_config()


def test_command_line_changes_replace_fields(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('dataset: a.hdf5\nout_dir: runs/x\nmax_steps: 10\n')
    cfg = load_train_config(str(path), max_steps=3, out_dir=None)
    assert cfg.max_steps == 3 and cfg.out_dir == 'runs/x'


def test_overrides_merge_into_the_preset():
    cfg = TrainConfig(dataset='d', out_dir='o', preset='tiny',
                      overrides={'transformer': {'n_layer': 3}, 'n_action_steps': 3})
    policy = cfg.policy_config()
    assert policy.transformer.n_layer == 3 and policy.n_action_steps == 3
    assert policy.transformer.n_emb == 32  # untouched preset field


@pytest.mark.parametrize('changes, field', [
    ({'batch_size': 0}, 'batch_size'),
    ({'device': 'tpu'}, 'device'),
    ({'overrides': {'transformer': {'n_layers': 3}}}, 'n_layers'),
    ({'overrides': {'transformer': {'n_layer': 'four'}}}, 'n_layer'),
    ({'preset': 'huge'}, 'huge'),
])
def test_invalid_values_name_the_field(changes, field):
    kwargs = {'dataset': 'd', 'out_dir': 'o'}
    kwargs.update(changes)
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**kwargs)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('dataset: a.hdf5\nout_dir: o\nlearning_rate: 0.1\n')
    with pytest.raises(ConfigError, match='learning_rate'):
        load_train_config(str(path))
