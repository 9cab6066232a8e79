"""Data-parallel training: two CPU processes (gloo) keep identical weights."""

import socket

import pytest
from test_training_train import tiny_train_config
import torch
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def worker(rank, world, port, cfg, out):
    import os
    os.environ.update({'RANK': str(rank), 'WORLD_SIZE': str(world), 'LOCAL_RANK': str(rank),
                       'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)})
    torch.set_num_threads(1)
    from sparse_policy_node.training.train_policy import train
    import torch.distributed as dist
    summary = train(cfg, progress=False)
    torch.save(summary['policy'].state_dict(), f'{out}/rank{rank}.pt')
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path):
    cfg = tiny_train_config(tmp_path, max_steps=2, checkpoint_every=2)
    mp.spawn(worker, args=(2, free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], msg=key)
    assert (tmp_path / 'run' / 'model' / 'model.safetensors').exists()  # rank 0 wrote it
