"""train-pruner on a device: the config knob, the CPU path unchanged, CUDA against CPU."""

import json
import os

import pytest
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.training.pruner_training import PrunerTrainConfig
from sparse_policy_node.training.pruner_training import resolve_device
from sparse_policy_node.training.pruner_training import train_pruner
from test_training_pruner import PCFG
from test_training_pruner import tiny_rollouts  # noqa: F401 (fixture)
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def _run(model_dir, path, out_dir, device):
    cfg = PrunerTrainConfig(target_sparsity=0.7, epochs=2, batch_episodes=2, val_episodes=1,
                            warmup_steps=1, threads=1, pruner=PCFG, device=device)
    train_pruner(model_dir, path, out_dir, cfg, progress=False)
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_device_knob_is_validated():
    with pytest.raises(ConfigError, match='device'):
        PrunerTrainConfig(device='tpu')
    assert resolve_device('cpu') == torch.device('cpu')
    if not torch.cuda.is_available():
        assert resolve_device('auto') == torch.device('cpu')
        with pytest.raises(ConfigError, match='no CUDA'):
            resolve_device('cuda')


def test_explicit_cpu_trains_exactly_like_the_default(tiny_rollouts, tmp_path):  # noqa: F811
    model_dir, path, _ = tiny_rollouts
    default = _run(model_dir, path, str(tmp_path / 'default'), 'cpu')
    auto = _run(model_dir, path, str(tmp_path / 'auto'),
                'auto' if not torch.cuda.is_available() else 'cpu')
    keys = ('train_loss', 'train_fidelity', 'train_sparsity', 'val_loss', 'val_fidelity')
    for a, b in zip(default, auto):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


@needs_cuda
def test_cuda_training_follows_the_cpu_run(tiny_rollouts, tmp_path):  # noqa: F811
    model_dir, path, _ = tiny_rollouts
    cpu = _run(model_dir, path, str(tmp_path / 'cpu'), 'cpu')
    gpu = _run(model_dir, path, str(tmp_path / 'cuda'), 'cuda')
    # Same initial weights and batches; float rounding differs between the devices, and an
    # argmax gate can flip on a near tie, so the losses agree loosely, the first epoch closely.
    assert gpu[0]['train_loss'] == pytest.approx(cpu[0]['train_loss'], rel=0.05, abs=1e-3)
    for row in gpu:
        assert row['train_loss'] == row['train_loss'] and 0.0 <= row['train_sparsity'] <= 1.0
