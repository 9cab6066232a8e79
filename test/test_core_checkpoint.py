"""Checkpoint directories: round trip, and clear errors for bad or mismatched files."""

import json
import os

from conftest import make_obs
import pytest
from safetensors.torch import load_file
from safetensors.torch import save_file
from sparse_policy_node.core.checkpoint import CheckpointError
from sparse_policy_node.core.checkpoint import load_policy
from sparse_policy_node.core.checkpoint import load_pruner
from sparse_policy_node.core.checkpoint import save_policy
from sparse_policy_node.core.checkpoint import save_pruner
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.pruner import Pruner
import torch


@pytest.fixture
def saved(tmp_path, tiny_policy):
    tiny_policy.normalizer.fit('action', torch.randn(100, 7) * 3)
    directory = str(tmp_path / 'model')
    save_policy(tiny_policy, directory, metadata={'trained_by': 'test'})
    return directory


def test_round_trip_gives_identical_outputs(saved, tiny_policy):
    loaded = load_policy(saved)
    obs = make_obs(tiny_policy)
    noise = torch.randn(1, 6, 7)
    step_noise = torch.randn(10, 1, 6, 7)
    a = tiny_policy.predict_action(obs, noise=noise, step_noise=step_noise)['action_pred']
    b = loaded.predict_action(obs, noise=noise, step_noise=step_noise)['action_pred']
    assert torch.equal(a, b)
    assert loaded.config == tiny_policy.config
    assert not loaded.training


def test_pruner_round_trip(tmp_path, tiny_policy):
    pruner = Pruner(PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32),
                    tiny_policy.transformer.num_units, tiny_policy.config.transformer.n_emb)
    save_pruner(pruner, str(tmp_path))
    loaded = load_pruner(str(tmp_path))
    for key, value in pruner.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_engine_runs_the_schedule_the_pruner_was_trained_for(tmp_path, tiny_policy):
    from sparse_policy_node.core.engine import load_engine
    directory = str(tmp_path / 'm')
    save_policy(tiny_policy, directory)
    assert load_engine(directory).runtime.sparsity_enabled is False
    pruner = Pruner(PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32),
                    tiny_policy.transformer.num_units, tiny_policy.config.transformer.n_emb)
    save_pruner(pruner, directory, metadata={'sampler': 'ddim', 'num_inference_steps': 5})
    runtime = load_engine(directory).runtime
    assert (runtime.sampler, runtime.num_inference_steps) == ('ddim', 5)
    assert runtime.sparsity_enabled and runtime.gate_source == 'pruner'


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'):
        load_policy(str(tmp_path / 'nope'))


def test_missing_config(saved):
    os.remove(os.path.join(saved, 'config.json'))
    with pytest.raises(CheckpointError, match='config.json does not exist'):
        load_policy(saved)


def read_config(directory):
    with open(os.path.join(directory, 'config.json')) as f:
        return json.load(f)


def write_config(directory, data):
    with open(os.path.join(directory, 'config.json'), 'w') as f:
        json.dump(data, f)


def test_corrupt_json(saved):
    with open(os.path.join(saved, 'config.json'), 'w') as f:
        f.write('{"format_version": 1, "policy": ')
    with pytest.raises(CheckpointError, match='not valid JSON'):
        load_policy(saved)


def test_unknown_config_field_is_named(saved):
    data = read_config(saved)
    data['policy']['transformer']['n_layers'] = 9
    write_config(saved, data)
    with pytest.raises(CheckpointError, match='n_layers'):
        load_policy(saved)


def test_wrong_format_version(saved):
    data = read_config(saved)
    data['format_version'] = 99
    write_config(saved, data)
    with pytest.raises(CheckpointError, match='format_version'):
        load_policy(saved)


def test_corrupt_weights(saved):
    with open(os.path.join(saved, 'model.safetensors'), 'wb') as f:
        f.write(b'\x00garbage' * 10)
    with pytest.raises(CheckpointError, match='not a readable safetensors'):
        load_policy(saved)


def test_architecture_mismatch_names_the_tensor(saved):
    data = read_config(saved)
    data['policy']['transformer']['n_emb'] = 64
    write_config(saved, data)
    with pytest.raises(CheckpointError, match='shape mismatch .*transformer'):
        load_policy(saved)


def test_missing_and_nonfinite_tensors(saved):
    path = os.path.join(saved, 'model.safetensors')
    state = load_file(path)
    dropped = dict(state)
    dropped.pop('transformer.head.weight')
    save_file(dropped, path)
    with pytest.raises(CheckpointError, match='missing tensors .*head.weight'):
        load_policy(saved)
    state['transformer.head.bias'][0] = float('nan')
    save_file(state, path)
    with pytest.raises(CheckpointError, match='NaN'):
        load_policy(saved)
