"""``sparse-policy train-policy``: train a DP-T diffusion policy on robomimic-layout demos.

Epsilon-prediction DDPM loss, AdamW, linear warm-up then cosine decay, an EMA copy of the
weights (what gets exported as the model), periodic checkpoints and ``--resume``. Launched
with ``torchrun --nproc_per_node N`` it trains data-parallel (gloo on CPU, NCCL on GPU); only
rank 0 writes files. Run directory::

    <out_dir>/train_config.yaml   the resolved TrainConfig
    <out_dir>/log.jsonl           one line per log_every steps
    <out_dir>/state.pt            resume state (weights, EMA, optimiser, LR schedule, step)
    <out_dir>/model/              latest EMA model (config.json + model.safetensors)
    <out_dir>/snapshots/step_N/   EMA model at every checkpoint
"""

import argparse
import copy
from dataclasses import asdict
import json
import math
import os
import time

from sparse_policy_node.core.checkpoint import save_policy
from sparse_policy_node.core.policy import DiffusionPolicy
from sparse_policy_node.tools.args import check_file
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import CommandError
from sparse_policy_node.training.config import load_train_config
from sparse_policy_node.training.config import TrainConfig
from sparse_policy_node.training.dataset import fit_normalizer
from sparse_policy_node.training.dataset import read_env_args
from sparse_policy_node.training.dataset import WindowDataset
import torch
from torch import nn
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data import DistributedSampler
from tqdm import tqdm
import yaml

STATE_FILE = 'state.pt'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument('--config', required=True, help='training YAML (config/train/*.yaml)')
    parser.add_argument('--resume', action='store_true',
                        help='continue from <out_dir>/state.pt')
    parser.add_argument('--dataset', help='demonstrations HDF5 (default: dataset of --config)')
    parser.add_argument('--out-dir', help='run directory (default: out_dir of --config)')
    parser.add_argument('--max-steps', type=int,
                        help='optimiser steps (default: max_steps of --config)')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'),
                        help='auto: CUDA when torch sees one (default: device of --config)')


def check_args(args) -> TrainConfig:
    """Read and check the config, its dataset and the resume state before training starts."""
    check_range(args.max_steps, '--max-steps', low=1)
    check_file(args.config, '--config', 'pass a training YAML such as '
               'config/train/lift_small.yaml')
    try:
        cfg = load_train_config(args.config, dataset=args.dataset, out_dir=args.out_dir,
                                max_steps=args.max_steps, device=args.device)
    except yaml.YAMLError as exc:
        raise CommandError(f'--config {args.config!r} is not valid YAML ({exc}); fix the '
                           f'file (see config/train/*.yaml)') from exc
    check_range(cfg.max_steps, f'max_steps of {args.config}', low=1)
    check_range(cfg.batch_size, f'batch_size of {args.config}', low=1)
    if cfg.device not in ('auto', 'cpu', 'cuda'):
        raise CommandError(f'device {cfg.device!r} of {args.config} is not auto, cpu or cuda; '
                           f'fix the file or pass --device')
    if cfg.device == 'cuda' and not torch.cuda.is_available():
        raise CommandError('device cuda was asked for but torch sees no CUDA device; pass '
                           '--device cpu (or auto)')
    cfg.policy_config()  # the preset and its overrides
    check_file(cfg.dataset, 'dataset', 'pass --dataset FILE (sparse-policy demos or '
               'dataset-from-bag writes one) or fix dataset in the config')
    try:
        read_env_args(cfg.dataset)
    except (OSError, KeyError, ValueError) as exc:
        raise CommandError(f'dataset {cfg.dataset!r} is not a robomimic-layout HDF5 file '
                           f'({exc}); pass the output of sparse-policy demos or '
                           f'dataset-from-bag') from exc
    state = os.path.join(cfg.out_dir, STATE_FILE)
    if args.resume and not os.path.isfile(state):
        raise CommandError(f'--resume: {state} does not exist; start without --resume, or '
                           f'pass the --out-dir of the run to continue')
    return cfg


class LossModule(nn.Module):
    """Wrap ``compute_loss`` as ``forward`` so DistributedDataParallel syncs its gradients."""

    def __init__(self, policy: DiffusionPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, obs, action):
        """Return the scalar DDPM loss of a batch."""
        return self.policy.compute_loss(obs, action)


class EMA:
    """Exponential moving average of weights with Diffusion Policy's warm-up.

    ``decay = min(max_decay, 1 - (1 + step) ** -power)``: early averages forget quickly so
    the EMA model is usable from the first checkpoints.
    """

    def __init__(self, model: nn.Module, power: float, max_decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power = power
        self.max_decay = max_decay

    def decay(self, step: int) -> float:
        """EMA decay after ``step`` optimiser steps."""
        return max(0.0, min(self.max_decay, 1.0 - (1.0 + step) ** -self.power))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend ``model``'s parameters in; copy its buffers (normalizer) as they are."""
        d = self.decay(step)
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(policy: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Build AdamW that decays matrices and kernels only (not biases, norms, embeddings)."""
    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        is_embedding = name.split('.')[-1].endswith('emb')  # learned position embeddings
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    groups = [{'params': decay, 'weight_decay': cfg.weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def setup_distributed(cfg: TrainConfig):
    """Join the torchrun process group when WORLD_SIZE > 1; return (rank, world, device)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    use_cuda = cfg.device == 'cuda' or (cfg.device == 'auto' and torch.cuda.is_available())
    if use_cuda:
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if use_cuda else 'gloo', init_method='env://')
    return rank, world, device


def to_device(obs: dict, action: torch.Tensor, device: torch.device):
    """Move a batch to ``device``."""
    obs = {k: v.to(device, non_blocking=True) for k, v in obs.items()}
    return obs, action.to(device, non_blocking=True)


def save_checkpoint(cfg, step, elapsed, epoch, policy, ema, optimizer, scheduler,
                    env_args: dict) -> None:
    """Write the resume state, the latest EMA model and a snapshot (rank 0 only)."""
    state = {'step': step, 'elapsed': elapsed, 'epoch': epoch,
             'policy': policy.state_dict(), 'ema': ema.model.state_dict(),
             'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict()}
    tmp = os.path.join(cfg.out_dir, STATE_FILE + '.tmp')
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(cfg.out_dir, STATE_FILE))
    metadata = {'dataset': cfg.dataset, 'steps': step, 'train_minutes': round(elapsed / 60, 2),
                'train_config': asdict(cfg), 'env_args': env_args}
    save_policy(ema.model, os.path.join(cfg.out_dir, 'model'), metadata)
    save_policy(ema.model, os.path.join(cfg.out_dir, 'snapshots', f'step_{step:07d}'),
                metadata)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train as ``cfg`` says; return a summary (steps, loss, minutes, model dir, modules)."""
    rank, world, device = setup_distributed(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    policy_config = cfg.policy_config()
    policy = DiffusionPolicy(policy_config)
    dataset = WindowDataset.from_hdf5(cfg.dataset, policy_config, cfg.max_demos)
    fit_normalizer(policy.normalizer, dataset.episodes)
    env_args = read_env_args(cfg.dataset)  # the task travels with the model for evaluation
    policy.to(device).train()
    ema = EMA(policy, cfg.ema_power, cfg.ema_max_decay)
    optimizer = make_optimizer(policy, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))
    step, elapsed, epoch = 0, 0.0, 0
    state_path = os.path.join(cfg.out_dir, STATE_FILE)
    if resume:
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f'--resume: {state_path} does not exist')
        state = torch.load(state_path, map_location=device, weights_only=True)
        policy.load_state_dict(state['policy'])
        ema.model.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        step, elapsed, epoch = state['step'], state['elapsed'], state['epoch']
    torch.manual_seed(cfg.seed + 1000 * rank + step)  # per-rank crops and diffusion noise
    model = LossModule(policy)
    if world > 1:
        model = DistributedDataParallel(model, broadcast_buffers=False)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, pin_memory=device.type == 'cuda')
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, 'train_config.yaml'), 'w') as f:
            yaml.safe_dump(asdict(cfg), f, sort_keys=False)
    n_params = sum(p.numel() for p in policy.parameters())
    bar = tqdm(total=cfg.max_steps, initial=step, desc='train', unit='step',
               disable=not progress or rank != 0)
    if rank == 0:
        bar.write(f'{n_params / 1e6:.2f} M parameters, {len(dataset)} windows from '
                  f'{len(dataset.episodes)} demos, world size {world}, device {device}')
    start = time.time() - elapsed
    loss_sum, loss_n, last_loss = 0.0, 0, float('nan')
    done = step >= cfg.max_steps
    while not done:
        # A resumed run restarts the interrupted epoch from its beginning.
        sampler.set_epoch(epoch)
        for obs, action in loader:
            obs, action = to_device(obs, action, device)
            loss = model(obs, action)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            ema.update(policy, step)
            loss_sum += loss.item()
            loss_n += 1
            bar.update(1)
            elapsed = time.time() - start
            out_of_time = cfg.max_minutes and elapsed > 60 * cfg.max_minutes
            done = step >= cfg.max_steps or bool(out_of_time)
            if step % cfg.log_every == 0 or done:
                last_loss = loss_sum / loss_n
                loss_sum, loss_n = 0.0, 0
                bar.set_postfix(loss=f'{last_loss:.4f}', lr=f'{scheduler.get_last_lr()[0]:.2e}')
                if rank == 0:
                    with open(os.path.join(cfg.out_dir, 'log.jsonl'), 'a') as f:
                        f.write(json.dumps({'step': step, 'loss': last_loss,
                                            'lr': scheduler.get_last_lr()[0],
                                            'minutes': round(elapsed / 60, 3)}) + '\n')
            if rank == 0 and (step % cfg.checkpoint_every == 0 or done):
                save_checkpoint(cfg, step, elapsed, epoch, policy, ema, optimizer, scheduler,
                                env_args)
            if done:
                break
        else:
            epoch += 1
    bar.close()
    if world > 1:
        dist.barrier()
    return {'steps': step, 'loss': last_loss, 'minutes': elapsed / 60, 'world_size': world,
            'model_dir': os.path.join(cfg.out_dir, 'model'), 'policy': policy, 'ema': ema.model}


def run(args: argparse.Namespace) -> int:
    """Train as the YAML file and the command-line overrides say."""
    cfg = check_args(args)
    summary = train(cfg, resume=args.resume)
    if int(os.environ.get('RANK', '0')) == 0:
        print(f'trained {summary["steps"]} steps in {summary["minutes"]:.1f} min, '
              f'loss {summary["loss"]:.4f}; EMA model -> {summary["model_dir"]}')
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
