"""Pruner training: one step moves sparsity to the target, cache carry/reset, a tiny run."""

import json
import os

import pytest
from sparse_policy_node.core.checkpoint import has_pruner
from sparse_policy_node.core.checkpoint import load_policy
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.engine import load_engine
from sparse_policy_node.core.pruner import Pruner
from sparse_policy_node.training.pruner_training import Episode
from sparse_policy_node.training.pruner_training import EpisodeBatch
from sparse_policy_node.training.pruner_training import FrameRunner
from sparse_policy_node.training.pruner_training import PrunerTrainConfig
from sparse_policy_node.training.pruner_training import run_epoch
from sparse_policy_node.training.pruner_training import train_pruner
from sparse_policy_node.training.rollouts import load_rollouts
from test_training_rollouts import write_tiny_rollouts
import torch

PCFG = PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32, dropout=0.0)


@pytest.fixture
def tiny_rollouts(tiny_policy, tmp_path):
    """(model_dir, rollout path, episodes) for the tiny policy, lengths 3, 2, 4."""
    model_dir, path = str(tmp_path / 'model'), str(tmp_path / 'rollouts.hdf5')
    write_tiny_rollouts(tiny_policy, model_dir, path)
    return model_dir, path, [Episode(r) for r in load_rollouts(path)]


def make_runner(policy, cfg, bias=(0.0, 0.0, 0.0, 0.0)):
    torch.manual_seed(0)
    pruner = Pruner(cfg.pruner, policy.transformer.num_units, policy.config.transformer.n_emb)
    with torch.no_grad():  # a uniform start, so the only signal is the one under test
        pruner.head.weight.zero_()
        pruner.head.bias.copy_(torch.tensor(bias))
    return FrameRunner(policy, pruner, 'ddpm', 10, cfg)


def test_one_step_moves_realized_sparsity_toward_the_target(tiny_policy, tiny_rollouts):
    cfg = PrunerTrainConfig(target_sparsity=0.8, lambda_sparse=10.0, pruner=PCFG)
    runner = make_runner(tiny_policy, cfg, bias=(0.05, 0.0, 0.0, 0.0))  # all compute
    params = {k: v.clone() for k, v in tiny_policy.state_dict().items()}
    batch = EpisodeBatch(tiny_rollouts[2])
    runner.reset()
    assert runner(batch.frame(0))['dense']
    with torch.no_grad():
        before = runner(batch.frame(1), hard=True)['sparsity'].mean()
    runner.reset()
    runner(batch.frame(0))
    optimizer = torch.optim.AdamW(runner.pruner.parameters(), lr=0.1)
    out = runner(batch.frame(1))
    assert not out['dense']
    assert torch.isfinite(out['loss']) and torch.isfinite(out['fidelity'])
    optimizer.zero_grad()
    out['loss'].backward()
    optimizer.step()
    runner.reset()
    runner(batch.frame(0))
    with torch.no_grad():
        after = runner(batch.frame(1), hard=True)['sparsity'].mean()
    assert before == 0.0
    assert abs(float(after) - 0.8) < abs(float(before) - 0.8)
    # The policy is frozen: no gradients, weights unchanged.
    assert all(not p.requires_grad and p.grad is None for p in tiny_policy.parameters())
    for key, value in tiny_policy.state_dict().items():
        assert torch.equal(value, params[key])


@pytest.mark.parametrize('max_age', [0, 1])
def test_sparsity_counts_expired_rollout_slots_as_compute(tiny_policy, tiny_rollouts, max_age):
    # Gates that always choose the rollout cache. With max age 1, frame 2 finds the slots of
    # frame 0 two chunks old: they expire and every unit computes, whatever the gates say;
    # the sparsity (and so the sparsity loss) must say so.
    cfg = PrunerTrainConfig(pruner=PCFG, rollout_max_age=max_age, directions=('rollout',))
    runner = make_runner(tiny_policy, cfg, bias=(0.0, 0.0, 0.0, 10.0))
    batch = EpisodeBatch(tiny_rollouts[2][2:])  # one episode of 4 frames
    runner.reset()
    with torch.no_grad():
        outs = [runner(batch.frame(f), hard=True) for f in range(batch.num_frames)]
    sparsity = [float(out['sparsity']) for out in outs]
    assert outs[0]['dense']  # the first chunk computes everything and fills the slots
    assert sparsity[1] > 0.5 and sparsity[3] > 0.5
    if max_age:
        assert sparsity[2] == 0.0  # every slot expired: all computed
    else:
        assert sparsity[2] == sparsity[1]


def test_all_compute_gates_reproduce_the_recorded_target(tiny_policy, tiny_rollouts):
    cfg = PrunerTrainConfig(pruner=PCFG)
    runner = make_runner(tiny_policy, cfg, bias=(10.0, 0.0, 0.0, 0.0))
    batch = EpisodeBatch(tiny_rollouts[2])
    runner.reset()
    for f in range(batch.num_frames):
        with torch.no_grad():
            out = runner(batch.frame(f), hard=True)
        assert out['sparsity'].max() == 0.0
        assert float(out['raw_l1']) < 1e-5  # noise-matched target: no loss floor


class SpyRunner(FrameRunner):
    """FrameRunner that logs the cache state seen by every frame."""

    def __call__(self, frame, hard=False):
        B = frame['noise'].shape[0]
        filled = bool(self.cache.rollout) and self.cache.rollout[3][1] is not None
        self.log.append({'B': B, 'carried': filled})
        out = super().__call__(frame, hard)
        self.log[-1]['dense'] = out['dense']
        cached = [v for row in self.cache.rollout for v in row if v is not None]
        assert len(cached) == 10 * self.policy.transformer.num_units
        assert all(v.shape[0] == B and not v.requires_grad for v in cached)
        return out


def test_rollout_cache_is_carried_across_frames_and_cleared_between_batches(tiny_policy,
                                                                            tiny_rollouts):
    cfg = PrunerTrainConfig(pruner=PCFG, batch_episodes=2)
    torch.manual_seed(0)
    pruner = Pruner(PCFG, tiny_policy.transformer.num_units, tiny_policy.config.transformer.n_emb)
    runner = SpyRunner(tiny_policy, pruner, 'ddpm', 10, cfg)
    runner.log = []
    episodes = tiny_rollouts[2]  # lengths 3, 2, 4 -> batches [3, 2] and [4]
    optimizer = torch.optim.AdamW(pruner.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    metrics = run_epoch(runner, episodes, 2, optimizer, sched, torch.Generator().manual_seed(1))
    log = runner.log
    # Every frame of every episode is trained (no truncation to the shortest episode).
    assert sum(row['B'] for row in log) == 3 + 2 + 4
    # One dense frame per batch, exactly where the cache was just cleared.
    assert [row['dense'] for row in log] == [not row['carried'] for row in log]
    assert sum(row['dense'] for row in log) == 2
    assert sorted(row['B'] for row in log if row['dense']) == [1, 2]
    assert 0.0 <= metrics['sparsity'] <= 1.0 and metrics['loss'] == metrics['loss']


def test_tiny_training_run_installs_a_loadable_pruner(tiny_policy, tiny_rollouts, tmp_path):
    model_dir, path, _ = tiny_rollouts
    cfg = PrunerTrainConfig(target_sparsity=0.7, epochs=2, batch_episodes=2, val_episodes=1,
                            warmup_steps=1, threads=1, pruner=PCFG)
    out_dir = str(tmp_path / 'run')
    summary = train_pruner(model_dir, path, out_dir, cfg, install=True, progress=False)
    rows = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    assert [r['epoch'] for r in rows] == [0, 1]
    assert all(r['train_loss'] == r['train_loss'] and 'val_fidelity' in r for r in rows)
    assert summary['metadata']['val_episodes'] == 1
    assert has_pruner(model_dir) and has_pruner(os.path.join(out_dir, 'best'))
    with open(os.path.join(model_dir, 'pruner.json')) as f:
        meta = json.load(f)['metadata']
    assert meta['sampler'] == 'ddpm' and meta['num_inference_steps'] == 10
    assert meta['target_sparsity'] == 0.7 and meta['train_seeds'] == [0, 1]
    engine = load_engine(model_dir)
    assert engine.pruner is not None and engine.runtime.gate_source == 'pruner'
    engine.close()


def test_rollouts_of_other_weights_are_refused(tiny_policy, tiny_rollouts, tmp_path):
    model_dir, path, _ = tiny_rollouts
    other = load_policy(model_dir)
    with torch.no_grad():
        other.transformer.head.bias.add_(1.0)
    from sparse_policy_node.core.checkpoint import save_policy
    other_dir = str(tmp_path / 'other')
    save_policy(other, other_dir)
    with pytest.raises(ValueError, match='other policy weights'):
        train_pruner(other_dir, path, str(tmp_path / 'run'), PrunerTrainConfig(pruner=PCFG),
                     progress=False)
