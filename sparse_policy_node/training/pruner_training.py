"""Trajectory-level training of the TTS pruner on recorded rollouts (tts_method.md §8).

The policy is frozen (``requires_grad_(False)``, eval mode) and is the model directory's own
(EMA) weights, checked against the fingerprint stored in the rollout file (the reference
trains on non-EMA weights and deploys EMA ones, §13.5). Per batch of episodes::

    cache.reset()                                      # new episodes: empty rollout cache
    for frame f = 0 .. longest episode - 1:            # one frame = one control step
        obs window -> frozen encoder -> memory / cross-attn K/V     (no grad)
        logits = pruner(time_mem, obs_mem)                            (B, K, U, 4)
        gates  = straight_through_gates(logits)        # one-hot forward, softmax backward
        f == 0: every unit computes (first-chunk rule), only L_s trains the pruner
        pred = sample_soft(K steps, gates, cache, recorded noise)    # differentiable
        L = fidelity(pred, recorded dense action_pred) + lambda * mean_i |s_i - rho|
            # s_i: the sparsity that runs, fallbacks (expired or empty slots) counted
        backward, AdamW step; the rollout cache (detached) carries over to frame f + 1

Episodes of different lengths are not truncated to the shortest (§13.4): a batch is sorted
longest first and, as episodes end, the batch and every cached tensor shrink to the episodes
still running, so no frame is dropped and no padding is computed.

Fidelity loss choice (§13.13): the reference uses L1 in raw action units, which weights the
action dimensions by their physical ranges. The default here, ``normalized_l1``, is the L1 in
the policy's normalized action space (every dimension mapped to [-1, 1] by the normalizer),
which weights dimensions equally; ``l1`` gives the reference's raw-unit loss. Because the
recorded target was sampled with the recorded noise, the loss of an all-compute pruner is 0
(up to float rounding) instead of a noise floor.
"""

from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
import json
import math
import os
import sys
import time
from typing import Dict
from typing import List
from typing import Optional
from typing import Sequence
from typing import Tuple

import numpy as np
from sparse_policy_node.core import keys
from sparse_policy_node.core.cache import FeatureCache
from sparse_policy_node.core.checkpoint import save_pruner
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import MATCHED_SPARSITY
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.config import REUSE_DIRECTIONS
from sparse_policy_node.core.gates import argmax_gates
from sparse_policy_node.core.gates import straight_through_gates
from sparse_policy_node.core.pruner import Pruner
from sparse_policy_node.core.scheduler import NoiseScheduler
from sparse_policy_node.core.sparse_sampler import sample_soft
from sparse_policy_node.training.config import DEVICES
import torch
import torch.nn.functional as F
from tqdm import tqdm

FIDELITY_LOSSES = ('normalized_l1', 'l1')


@dataclass
class PrunerTrainConfig:
    """One pruner training run.

    Args:
        target_sparsity: rho, the share of (step, unit) entries to reuse.
        directions: allowed reuse directions.
        lambda_sparse: weight of the sparsity loss.
        fidelity: ``'normalized_l1'`` (default) or ``'l1'`` (raw units, as the reference).
        epochs: passes over the training episodes.
        batch_episodes: episodes per batch (trained side by side, frame by frame).
        val_episodes: episodes held out for validation (the last ones of the file).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up (optimizer steps) before a cosine decay to ``lr / 10``.
        max_minutes: wall-time budget: the learning rate anneals by then, training stops at
            the first episode-batch boundary after it, then validates and saves; 0 disables.
        seed: seed of initialisation and episode order.
        threads: torch CPU threads; 0 leaves torch's default.
        rollout_max_age: cache aging during training, as deployed (``RuntimeConfig``): a
            rollout slot older than this many frames falls back to compute; 0 never.
        pruner: pruner architecture.
        device: ``cpu`` (default), ``cuda`` or ``auto`` (CUDA when available): where the
            frozen policy, the pruner and every batch live.
    """

    target_sparsity: float = MATCHED_SPARSITY
    directions: Tuple[str, ...] = REUSE_DIRECTIONS
    lambda_sparse: float = 1.0
    fidelity: str = 'normalized_l1'
    epochs: int = 20
    batch_episodes: int = 8
    val_episodes: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    max_minutes: float = 0.0
    seed: int = 0
    threads: int = 0
    rollout_max_age: int = 0
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    device: str = 'cpu'

    def __post_init__(self):
        self.directions = tuple(self.directions)
        if self.device not in DEVICES:
            raise ConfigError(f'PrunerTrainConfig.device must be one of {DEVICES}, '
                              f'got {self.device!r}')
        if not 0.0 <= self.target_sparsity <= 0.99:
            raise ConfigError(f'PrunerTrainConfig.target_sparsity must be in [0, 0.99], '
                              f'got {self.target_sparsity!r}')
        if not self.directions or any(d not in REUSE_DIRECTIONS for d in self.directions):
            raise ConfigError(f'PrunerTrainConfig.directions must be a non-empty subset of '
                              f'{REUSE_DIRECTIONS}, got {self.directions!r}')
        if self.fidelity not in FIDELITY_LOSSES:
            raise ConfigError(f'PrunerTrainConfig.fidelity must be one of {FIDELITY_LOSSES}, '
                              f'got {self.fidelity!r}')
        for name in ('epochs', 'batch_episodes'):
            if getattr(self, name) < 1:
                raise ConfigError(f'PrunerTrainConfig.{name} must be >= 1, '
                                  f'got {getattr(self, name)!r}')
        if min(self.val_episodes, self.warmup_steps, self.threads, self.rollout_max_age) < 0:
            raise ConfigError('PrunerTrainConfig.val_episodes, warmup_steps, threads and '
                              'rollout_max_age must be >= 0')
        if not self.lr > 0 or self.lambda_sparse < 0 or self.max_minutes < 0:
            raise ConfigError(f'PrunerTrainConfig needs lr > 0, lambda_sparse >= 0 and '
                              f'max_minutes >= 0, got {self.lr!r}, {self.lambda_sparse!r}, '
                              f'{self.max_minutes!r}')


# ==== episodes as tensors ====

class Episode:
    """One recorded episode as tensors (see :func:`rollouts.load_rollouts`)."""

    def __init__(self, record: dict):
        self.name = record.get('name', '')
        self.attrs = record.get('attrs', {})
        self.obs = {k: torch.from_numpy(np.ascontiguousarray(v))
                    for k, v in record['obs'].items()}  # (F, T_o, ...)
        self.noise = torch.from_numpy(record['noise']).float()  # (F, T_a, A)
        self.step_noise = torch.from_numpy(record['step_noise']).float()  # (F, K, T_a, A)
        self.target = torch.from_numpy(record['action_pred']).float()  # (F, T_a, A)

    def __len__(self) -> int:
        return self.target.shape[0]


class EpisodeBatch:
    """Episodes trained side by side, longest first, so running episodes are a prefix."""

    def __init__(self, episodes: Sequence[Episode]):
        self.episodes = sorted(episodes, key=len, reverse=True)
        self.lengths = [len(e) for e in self.episodes]

    @property
    def num_frames(self) -> int:
        """Return the number of frames of the longest episode."""
        return self.lengths[0]

    def active(self, frame: int) -> int:
        """Count the episodes that still run at ``frame``."""
        return sum(n > frame for n in self.lengths)

    def frame(self, frame: int, device='cpu') -> dict:
        """Stack control step ``frame`` of the running episodes, on ``device``.

        Returns:
            ``obs`` {key: (n, T_o, ...)}, ``noise`` (n, T_a, A), ``step_noise``
            (K, n, T_a, A) and ``target`` (n, T_a, A), n = :meth:`active`.
        """
        running = self.episodes[:self.active(frame)]
        # Stacked on the host, then one copy per tensor (uint8 images travel as uint8).
        return {
            'obs': {k: torch.stack([e.obs[k][frame] for e in running]).to(device)
                    for k in running[0].obs},
            'noise': torch.stack([e.noise[frame] for e in running]).to(device),
            'step_noise': torch.stack([e.step_noise[frame] for e in running],
                                      dim=1).to(device),
            'target': torch.stack([e.target[frame] for e in running]).to(device),
        }


def narrow_cache(cache: FeatureCache, n: int) -> None:
    """Keep the first ``n`` samples of every cached (B, T_a, D) tensor (episodes that ended)."""
    cache.narrow_(n)


# ==== one control step ====

class FrameRunner:
    """Run one control step of a batch of episodes through the frozen policy and the pruner."""

    def __init__(self, policy, pruner: Pruner, sampler: str, num_steps: int,
                 cfg: PrunerTrainConfig):
        self.policy = policy.eval().requires_grad_(False)
        self.pruner = pruner
        self.cfg = cfg
        self.scheduler = NoiseScheduler(policy.config.scheduler)
        self.scheduler.set_timesteps(num_steps, sampler)
        self.schedule = ('train', sampler, *self.scheduler.timesteps.tolist())
        model = policy.transformer
        self.device = device = next(policy.parameters()).device
        with torch.no_grad():
            self.time_mem = model.encode_time_tokens(self.scheduler.timesteps.to(device))
            self.time_kv = model.time_kv(self.time_mem)
        self.cache = FeatureCache(model.num_units)

    def reset(self) -> None:
        """Start new episodes: clear every cache (the next frame runs dense)."""
        self.cache.reset()

    def __call__(self, frame: dict, hard: bool = False) -> Dict[str, torch.Tensor]:
        """Sample one chunk per running episode with the pruner's gates.

        Args:
            frame: one :meth:`EpisodeBatch.frame`.
            hard: use argmax gates with no gradient (validation / deployment); otherwise
                straight-through gates.

        Returns:
            ``loss`` (scalar, differentiable unless ``hard``), ``fidelity``, ``sparse_loss``,
            ``raw_l1`` (raw action units), ``sparsity`` ((B,): the sparsity that runs,
            expired and empty slots counted as compute; the gates' own on a dense frame),
            ``dense`` (bool: the first-chunk rule forced every unit to compute).
        """
        cfg, policy = self.cfg, self.policy
        model, K, U = policy.transformer, self.scheduler.num_steps, policy.transformer.num_units
        B = frame['noise'].shape[0]
        if self.cache.rollout and self.cache.rollout[0][0] is not None:
            if self.cache.rollout[0][0].shape[0] != B:
                narrow_cache(self.cache, B)
        with torch.no_grad():
            cond = policy.encode_obs(frame['obs'])
            obs_mem = model.encode_obs_tokens(cond)  # (B, T_o, D)
            kv_all = model.assemble_kv(self.time_kv, model.obs_kv(obs_mem))
        dense = self.cache.begin_chunk(self.schedule, K, cfg.rollout_max_age)
        with torch.set_grad_enabled(not hard):
            logits = self.pruner(self.time_mem, obs_mem)  # (B, K, U, 4)
            if hard:
                gates = F.one_hot(argmax_gates(logits, cfg.directions), 4).to(logits.dtype)
            else:
                gates = straight_through_gates(logits, cfg.directions)  # (B, K, U, 4)
        # The first chunk computes every unit (it fills the rollout cache); its prediction
        # does not depend on the gates, so it runs without building a graph.
        with torch.set_grad_enabled(not hard and not dense):
            used = F.one_hot(torch.zeros(B, K, U, dtype=torch.long, device=self.device),
                             4).float() if dense else gates
            pred, compute = sample_soft(model, self.scheduler, kv_all, frame['noise'], used,
                                        self.cache, frame['step_noise'],
                                        return_compute=True)  # (B, T_a, A), (B, K, U)
            target = policy.normalizer.normalize(keys.ACTION, frame['target'])
            if cfg.fidelity == 'normalized_l1':
                fidelity = (pred - target).abs().mean()
            else:
                fidelity = (policy.normalizer.unnormalize(keys.ACTION, pred)
                            - frame['target']).abs().mean()
        with torch.set_grad_enabled(not hard):
            # The sparsity that runs: a gate whose rollout slot has expired (aging) or whose
            # candidate is empty computes. Before, the loss counted the gates alone; with
            # aging a pruner trained to 0.93 realized 0.77 on Can. A dense frame ran no
            # gates: its sparsity is the gates' own, so that only L_s trains on it.
            ran = gates[..., 0] if dense else compute  # (B, K, U)
            sparsity = 1.0 - ran.mean(dim=(1, 2))  # (B,)
            sparse_loss = (sparsity - cfg.target_sparsity).abs().mean()
        raw = (policy.normalizer.unnormalize(keys.ACTION, pred.detach())
               - frame['target']).abs().mean()
        self.cache.detach_()
        return {'loss': fidelity + cfg.lambda_sparse * sparse_loss, 'fidelity': fidelity,
                'sparse_loss': sparse_loss, 'raw_l1': raw, 'sparsity': sparsity.detach(),
                'dense': dense}


# ==== training loop ====

def lr_factor(step: int, total: int, warmup: int, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay from 1 to 0.1.

    The decay ends at step ``total`` or when ``time_progress`` (elapsed share of a wall-time
    budget) reaches 1, whichever comes first, so a run cut by its time budget still anneals.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_progress))
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


class WallClockSchedule:
    """Per-step learning rate: :func:`lr_factor` with the run's wall-time budget."""

    def __init__(self, optimizer, base_lr: float, total: int, warmup: int, max_minutes: float):
        self.optimizer, self.base_lr = optimizer, base_lr
        self.total, self.warmup = total, warmup
        self.budget_s = 60.0 * max_minutes
        self.start = time.time()
        self.steps = 0
        self._apply()

    def _apply(self) -> None:
        elapsed = (time.time() - self.start) / self.budget_s if self.budget_s else 0.0
        factor = lr_factor(self.steps, self.total, self.warmup, elapsed)
        for group in self.optimizer.param_groups:
            group['lr'] = self.base_lr * factor

    def step(self) -> None:
        """Advance one optimizer step."""
        self.steps += 1
        self._apply()


def split_episodes(episodes: List[Episode], val_episodes: int):
    """Hold out the last ``val_episodes`` episodes (at least one stays for training)."""
    n_val = min(val_episodes, len(episodes) - 1)
    if n_val <= 0:
        return episodes, []
    return episodes[:-n_val], episodes[-n_val:]


class _Meter:

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, name, value, weight=1):
        value = float(value.detach()) if torch.is_tensor(value) else float(value)
        self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.counts[name] = self.counts.get(name, 0) + weight

    def means(self) -> dict:
        return {k: self.sums[k] / max(self.counts[k], 1) for k in self.sums}


def _record(meter: _Meter, out: dict) -> None:
    B = out['sparsity'].shape[0]
    for name in ('loss', 'fidelity', 'sparse_loss', 'raw_l1'):
        meter.add(name, out[name], B)
    meter.add('sparsity', out['sparsity'].mean(), B)
    if not out['dense']:
        # Sparsity actually executed (the first chunk of an episode computes everything).
        meter.add('sparsity_executed', out['sparsity'].mean(), B)
        meter.add('fidelity_sparse_frames', out['fidelity'], B)


def run_epoch(runner: FrameRunner, episodes: List[Episode], batch_episodes: int,
              optimizer=None, scheduler=None, generator=None, bar=None,
              deadline: float = 0.0) -> dict:
    """One pass over ``episodes``; trains when ``optimizer`` is given, else validates.

    Returns:
        mean ``loss``, ``fidelity``, ``sparse_loss``, ``raw_l1``, ``sparsity`` (all frames)
        and ``sparsity_executed`` / ``fidelity_sparse_frames`` (frames after the first).
    """
    train = optimizer is not None
    runner.pruner.train(train)
    order = (torch.randperm(len(episodes), generator=generator).tolist() if train
             else list(range(len(episodes))))
    meter = _Meter()
    for start in range(0, len(order), batch_episodes):
        if deadline and time.time() > deadline:
            break
        batch = EpisodeBatch([episodes[i] for i in order[start:start + batch_episodes]])
        runner.reset()
        for f in range(batch.num_frames):
            out = runner(batch.frame(f, runner.device), hard=not train)
            if train:
                optimizer.zero_grad(set_to_none=True)
                if out['loss'].requires_grad:  # False only for a dense frame with lambda 0
                    out['loss'].backward()
                    optimizer.step()
                scheduler.step()
            _record(meter, out)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f'{float(out["loss"].detach()):.4f}',
                                sparsity=f'{float(out["sparsity"].mean()):.3f}')
    return meter.means()


def check_rollouts(attrs: dict, model_dir: str, allow_other_policy: bool = False) -> None:
    """Refuse rollouts recorded with other weights than the model directory's (EMA) policy."""
    from sparse_policy_node.training.rollouts import policy_fingerprint
    recorded = attrs.get('policy_sha256')
    if recorded != policy_fingerprint(model_dir) and not allow_other_policy:
        raise ValueError(f'the rollouts were recorded with other policy weights '
                         f'({attrs.get("model_dir")!r}) than {model_dir!r}; train the pruner '
                         f'on rollouts of the deployed weights (or pass allow_other_policy)')


def resolve_device(device: str) -> torch.device:
    """Map ``auto`` / ``cpu`` / ``cuda`` to a torch device; ``cuda`` needs one."""
    if device == 'cuda' and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device")
    if device == 'cuda' or (device == 'auto' and torch.cuda.is_available()):
        return torch.device('cuda')
    return torch.device('cpu')


def train_pruner(model_dir: str, rollouts: str, out_dir: str, cfg: PrunerTrainConfig,
                 install: bool = False, allow_other_policy: bool = False,
                 progress: bool = True, episode_indices: Optional[Sequence[int]] = None) -> dict:
    """Train a pruner for the policy of ``model_dir`` on a rollout file.

    Writes ``log.jsonl``, ``best/`` (lowest validation loss, or last training epoch without
    validation episodes) and ``last/`` pruner directories under ``out_dir``; with ``install``
    the best pruner is saved next to the policy in ``model_dir``. ``episode_indices`` (file
    order) trains on those episodes only.

    Returns:
        summary with the best epoch, its metrics and the metadata stored with the pruner.
    """
    from sparse_policy_node.core.checkpoint import load_policy
    from sparse_policy_node.training.rollouts import load_rollouts
    from sparse_policy_node.training.rollouts import read_rollout_attrs
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    attrs = read_rollout_attrs(rollouts)
    check_rollouts(attrs, model_dir, allow_other_policy)
    sampler, num_steps = str(attrs['sampler']), int(attrs['num_inference_steps'])
    device = resolve_device(cfg.device)
    policy = load_policy(model_dir, device)
    records = load_rollouts(rollouts)
    if episode_indices is not None:
        records = [records[i] for i in episode_indices]
    episodes = [Episode(r) for r in records]
    if len(episodes) < 1:
        raise ValueError(f'{rollouts} holds no episodes')
    train_eps, val_eps = split_episodes(episodes, cfg.val_episodes)
    torch.manual_seed(cfg.seed)
    pruner = Pruner(cfg.pruner, policy.transformer.num_units, policy.config.transformer.n_emb)
    pruner.to(device)  # after the CPU initialisation, so every device starts alike
    runner = FrameRunner(policy, pruner, sampler, num_steps, cfg)
    optimizer = torch.optim.AdamW(pruner.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    frames_per_epoch = sum(len(e) for e in train_eps)
    steps_per_epoch = sum(max(len(e) for e in train_eps[i:i + cfg.batch_episodes])
                          for i in range(0, len(train_eps), cfg.batch_episodes))
    total = cfg.epochs * steps_per_epoch
    scheduler = WallClockSchedule(optimizer, cfg.lr, total, cfg.warmup_steps, cfg.max_minutes)
    generator = torch.Generator().manual_seed(cfg.seed)
    os.makedirs(out_dir, exist_ok=True)
    metadata = {
        'sampler': sampler, 'num_inference_steps': num_steps,
        'target_sparsity': cfg.target_sparsity, 'directions': list(cfg.directions),
        'train_config': asdict(cfg),
        'rollouts': os.path.abspath(rollouts), 'policy_sha256': attrs.get('policy_sha256'),
        'train_episodes': len(train_eps), 'val_episodes': len(val_eps),
        'train_seeds': [int(e.attrs.get('seed', -1)) for e in train_eps],
        'val_seeds': [int(e.attrs.get('seed', -1)) for e in val_eps],
        'frames_per_epoch': frames_per_epoch,
    }
    with open(os.path.join(out_dir, 'run.json'), 'w') as f:
        json.dump(metadata, f, indent=2)
    start, best = time.time(), None
    log_path = os.path.join(out_dir, 'log.jsonl')
    open(log_path, 'w').close()
    for epoch in range(cfg.epochs):
        bar = tqdm(total=steps_per_epoch, desc=f'pruner epoch {epoch}',
                   unit='frame', disable=not progress, file=sys.stderr)
        deadline = start + 60 * cfg.max_minutes if cfg.max_minutes else 0.0
        train_metrics = run_epoch(runner, train_eps, cfg.batch_episodes, optimizer, scheduler,
                                  generator, bar, deadline)
        bar.close()
        with torch.no_grad():
            val_metrics = run_epoch(runner, val_eps, cfg.batch_episodes) if val_eps else {}
        row = {'epoch': epoch, 'minutes': (time.time() - start) / 60,
               'lr': optimizer.param_groups[0]['lr'],
               **{f'train_{k}': v for k, v in train_metrics.items()},
               **{f'val_{k}': v for k, v in val_metrics.items()}}
        with open(log_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        score = val_metrics.get('loss', train_metrics['loss'])
        save_pruner(pruner, os.path.join(out_dir, 'last'), dict(metadata, **row))
        if best is None or score < best['score']:
            best = {'score': score, 'epoch': epoch, 'metrics': row}
            save_pruner(pruner, os.path.join(out_dir, 'best'), dict(metadata, **row))
        if progress:
            print(f'epoch {epoch}: ' + ', '.join(f'{k} {v:.4f}' for k, v in row.items()
                                                 if isinstance(v, float)), file=sys.stderr)
        if cfg.max_minutes and time.time() - start > 60 * cfg.max_minutes:
            break
    summary = {'best_epoch': best['epoch'], 'best': best['metrics'], 'last': row,
               'out_dir': out_dir, 'minutes': (time.time() - start) / 60, 'metadata': metadata}
    if install:
        summary['installed'] = install_pruner(os.path.join(out_dir, 'best'), model_dir)
    return summary


def install_pruner(pruner_dir: str, model_dir: str) -> str:
    """Copy a trained pruner (config, weights, metadata) into the model directory.

    A model keeps one pruner per schedule: the top-level ``pruner.json`` when it is free or
    holds the same schedule, else ``pruners/<sampler>-<K>/``. Returns the directory written.
    """
    from sparse_policy_node.core.checkpoint import load_pruner
    from sparse_policy_node.core.checkpoint import pruner_dirs
    from sparse_policy_node.core.checkpoint import PRUNERS_DIR
    from sparse_policy_node.core.checkpoint import schedule_name
    pruner = load_pruner(pruner_dir, policy_dir=model_dir)
    existing = {d: s for s, d in pruner_dirs(model_dir).items()}
    target = model_dir
    if model_dir in existing and existing[model_dir] != pruner.schedule:
        if pruner.schedule is None:
            raise ValueError(f'{pruner_dir} records no schedule and {model_dir} already has a '
                             f'pruner; retrain it with this package to record one')
        target = os.path.join(model_dir, PRUNERS_DIR, schedule_name(*pruner.schedule))
    save_pruner(pruner, target, pruner.metadata)
    return target


def read_log(out_dir: str) -> List[dict]:
    """Return the per-epoch rows of a run's ``log.jsonl``."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]
