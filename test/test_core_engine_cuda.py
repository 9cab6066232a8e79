"""CUDA path of the engine (side-stream pruner); skipped on machines without a GPU."""

from conftest import make_obs
import pytest
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.engine import SparseEngine
from sparse_policy_node.core.pruner import Pruner
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def test_cuda_side_stream_gates_match_cpu(tiny_policy):
    torch.manual_seed(0)
    pruner = Pruner(PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32),
                    tiny_policy.transformer.num_units, tiny_policy.config.transformer.n_emb)
    rt = RuntimeConfig(gate_source='pruner', target_sparsity=0.6, num_inference_steps=10)
    cpu = SparseEngine(tiny_policy, pruner.eval(), rt)
    obs = make_obs(tiny_policy)
    for _ in range(2):
        cpu.predict_action(obs)
    expected = cpu.last_gates.clone()
    gpu_policy = tiny_policy.to('cuda')
    gpu = SparseEngine(gpu_policy, pruner.to('cuda').eval(), rt)
    obs = {k: v.cuda() for k, v in obs.items()}
    for _ in range(2):
        out = gpu.predict_action(obs)
    assert torch.isfinite(out['action']).all()
    assert out['action'].device.type == 'cuda'
    # Gate decisions may flip only where logits tie within float noise.
    assert (gpu.last_gates == expected).float().mean() > 0.95
