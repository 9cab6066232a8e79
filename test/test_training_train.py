"""One tiny training run on CPU in seconds: loss, EMA export, checkpoints and resume."""

import json
import os

import numpy as np
import pytest
from sparse_policy_node.core.checkpoint import load_policy
from sparse_policy_node.core.checkpoint import read_metadata
from sparse_policy_node.training.config import TrainConfig
from sparse_policy_node.training.dataset import DemoWriter
from sparse_policy_node.training.train_policy import EMA
from sparse_policy_node.training.train_policy import lr_factor
from sparse_policy_node.training.train_policy import train
import torch


def write_tiny_demos(path, episodes=3, length=12, seed=0):
    """Write random demos shaped for the tiny preset (32x32 agentview + proprioception)."""
    rng = np.random.default_rng(seed)
    with DemoWriter(path, {'env_name': 'Lift', 'task': 'lift'}) as writer:
        for _ in range(episodes):
            obs = [{'agentview_image': rng.integers(0, 256, (3, 32, 32), dtype=np.uint8),
                    'robot0_eef_pos': rng.normal(size=3).astype(np.float32),
                    'robot0_eef_quat': rng.normal(size=4).astype(np.float32),
                    'robot0_gripper_qpos': rng.normal(size=2).astype(np.float32)}
                   for _ in range(length)]
            writer.add(obs, rng.uniform(-1, 1, (length, 7)).astype(np.float32))


def tiny_train_config(tmp_path, **changes):
    dataset = str(tmp_path / 'demos.hdf5')
    if not os.path.exists(dataset):
        write_tiny_demos(dataset)
    kwargs = {'dataset': dataset, 'out_dir': str(tmp_path / 'run'), 'preset': 'tiny',
              'batch_size': 8, 'max_steps': 4, 'warmup_steps': 1, 'checkpoint_every': 2,
              'log_every': 1, 'threads': 1, 'device': 'cpu'}
    kwargs.update(changes)
    return TrainConfig(**kwargs)


def test_tiny_training_exports_a_loadable_ema_model_and_resumes(tmp_path):
    cfg = tiny_train_config(tmp_path)
    summary = train(cfg, progress=False)
    assert summary['steps'] == 4 and np.isfinite(summary['loss'])
    model = load_policy(summary['model_dir'])
    # the normalizer was fitted on the data and travels with the weights
    assert not torch.allclose(model.normalizer.normalize('action', torch.zeros(7)),
                              torch.zeros(7))
    assert read_metadata(summary['model_dir'])['env_args']['task'] == 'lift'
    ema_state = summary['ema'].state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ema_state[key])
    assert sorted(os.listdir(os.path.join(cfg.out_dir, 'snapshots'))) == [
        'step_0000002', 'step_0000004']
    resumed = train(tiny_train_config(tmp_path, max_steps=6), resume=True, progress=False)
    assert resumed['steps'] == 6
    with open(os.path.join(cfg.out_dir, 'log.jsonl')) as f:
        steps = [json.loads(line)['step'] for line in f]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_without_state_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='state.pt'):
        train(tiny_train_config(tmp_path), resume=True, progress=False)


def test_lr_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, warmup=10, total=110) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.5)
    assert factors[110] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_ema_decay_warms_up_and_averages():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, power=0.75, max_decay=0.9999)
    assert ema.decay(0) == 0.0 and 0.99 < ema.decay(10000) < 0.9999
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 0)  # decay 0: copy
    torch.testing.assert_close(ema.model.weight, model.weight)
    assert not ema.model.weight.requires_grad
