"""The denoising loop issues no host transfer or synchronisation (checked on CPU with a spy).

On a GPU every ``.item()``, ``.tolist()``, ``.cpu()``, ``bool(tensor)``, host-created tensor or
``.to(device)`` inside the per-step loop stalls the launch queue. The spy below records those
calls while :func:`sample_sparse` runs; the gate function (the one event wait before step 1,
see :mod:`engine`) is the only place allowed to read the device, and it is called once.
``test_core_engine_cuda.py`` repeats the check on a GPU with ``torch.cuda.set_sync_debug_mode``.
"""

from conftest import make_obs
import pytest
from sparse_policy_node.core import engine as engine_module
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.engine import SparseEngine
from sparse_policy_node.core.pruner import Pruner
from sparse_policy_node.core.sampler import chunk_noise
from sparse_policy_node.core.sampler import device_generator
import torch
from torch.overrides import TorchFunctionMode

# Tensor methods that read a tensor back to the host (a device sync on a GPU).
READS = {'item', 'tolist', 'cpu', 'numpy', '__bool__', '__int__', '__float__', '__index__',
         'cuda', 'pin_memory'}
# Tensor constructors: on the host unless a device is named.
FACTORIES = {'tensor', 'as_tensor', 'from_numpy', 'zeros', 'ones', 'full', 'empty', 'arange',
             'randn', 'rand', 'randint', 'randperm', 'linspace', 'eye', 'normal'}


def _names_device(args, kwargs) -> bool:
    if 'device' in kwargs:
        return True
    return any(isinstance(a, (str, torch.device)) or torch.is_tensor(a) for a in args[1:])


class TransferSpy(TorchFunctionMode):
    """Record host reads, host tensor creation and device moves while active."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', str(func))
        if not self.paused:
            if name in READS:
                self.calls.append(name)
            elif name in FACTORIES and kwargs.get('device') is None:
                self.calls.append(f'{name} on the host')
            elif name in ('to', 'copy_') and _names_device(args, kwargs):
                self.calls.append(f'{name}(device)')
        return func(*args, **kwargs)


@pytest.fixture
def spied(monkeypatch):
    """Patch the engine's loop so a spy watches it; returns the list of per-chunk records."""
    records = []
    loop = engine_module.sample_sparse

    def watched(model, scheduler, kv_all, noise, gates_fn, *args, **kwargs):
        spy = TransferSpy()
        waits = []

        def gates_once():
            spy.paused = True  # the one allowed wait, before step 1
            try:
                waits.append(1)
                return gates_fn()
            finally:
                spy.paused = False

        with spy:
            out = loop(model, scheduler, kv_all, noise,
                       None if gates_fn is None else gates_once, *args, **kwargs)
        records.append({'calls': spy.calls, 'waits': len(waits)})
        return out

    monkeypatch.setattr(engine_module, 'sample_sparse', watched)
    return records


def _pruner(policy):
    torch.manual_seed(1)
    return Pruner(PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32),
                  policy.transformer.num_units, policy.config.transformer.n_emb).eval()


RUNTIMES = {
    'learned': RuntimeConfig(gate_source='pruner', num_inference_steps=10),
    'dial': RuntimeConfig(gate_source='pruner', target_sparsity=0.6, num_inference_steps=10,
                          rollout_max_age=1),
    'static': RuntimeConfig(gate_source='static', target_sparsity=0.5, num_inference_steps=10),
    'random': RuntimeConfig(gate_source='random', target_sparsity=0.7, num_inference_steps=10),
    'dense': RuntimeConfig(sparsity_enabled=False, num_inference_steps=10),
}


@pytest.mark.parametrize('name', sorted(RUNTIMES))
def test_loop_issues_no_host_transfer(tiny_policy, spied, name):
    engine = SparseEngine(tiny_policy, _pruner(tiny_policy), RUNTIMES[name])
    shape = tiny_policy.action_shape(1)
    g = torch.Generator().manual_seed(0)
    for chunk in range(4):
        # The variance noise is drawn before the loop, as the engine does on a GPU.
        noise, step_noise = chunk_noise(shape, 10, True, g)
        out = engine.predict_action(make_obs(tiny_policy, seed=chunk), noise=noise,
                                    step_noise=step_noise)
        assert torch.isfinite(out['action']).all()
    engine.close()
    assert len(spied) == 4
    for chunk, record in enumerate(spied):
        assert record['calls'] == [], (chunk, record['calls'])
        assert record['waits'] == (0 if chunk == 0 else 1)  # chunk 0 is dense, no gates


def test_spy_sees_a_per_step_host_draw(tiny_policy, spied):
    # Without pre-drawn variance noise a CPU engine draws it per step on the host (kept on
    # CPU for bit-identical results); the spy must notice, or the test above proves nothing.
    engine = SparseEngine(tiny_policy, None, RUNTIMES['dense'])
    engine.predict_action(make_obs(tiny_policy), generator=torch.Generator().manual_seed(0))
    engine.close()
    assert 'to(device)' in spied[0]['calls']  # the host draw's copy to the sample's device


def test_device_generator_follows_the_host_seed():
    cpu = torch.device('cpu')
    own = torch.Generator().manual_seed(5)
    assert device_generator(cpu, own) is own  # already on the device: used as is
    torch.manual_seed(3)
    a = chunk_noise((1, 4, 2), 3, True, device_generator(torch.device('meta'), None,
                                                         torch.Generator()))
    torch.manual_seed(3)
    b = chunk_noise((1, 4, 2), 3, True, device_generator(torch.device('meta'), None,
                                                         torch.Generator()))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].shape == (3, 1, 4, 2)
    noise, step_noise = chunk_noise((1, 4, 2), 3, False, torch.Generator())
    assert step_noise is None and noise.shape == (1, 4, 2)


def test_reduced_precision_is_close_and_float32_untouched(tiny_policy):
    obs = make_obs(tiny_policy)
    g = torch.Generator().manual_seed(0)
    noise, step_noise = chunk_noise(tiny_policy.action_shape(1), 10, True, g)
    out = {}
    for precision in ('float32', 'bfloat16'):
        rt = RuntimeConfig(sparsity_enabled=False, num_inference_steps=10, precision=precision)
        engine = SparseEngine(tiny_policy, None, rt)
        out[precision] = engine.predict_action(obs, noise=noise,
                                               step_noise=step_noise)['action_pred']
        engine.close()
    dense = tiny_policy.predict_action(obs, noise=noise, step_noise=step_noise)['action_pred']
    assert torch.equal(out['float32'], dense)
    assert out['bfloat16'].dtype == torch.float32
    assert next(tiny_policy.transformer.parameters()).dtype == torch.float32
    assert (out['bfloat16'] - dense).abs().max() < 0.1 * dense.abs().max() + 1e-3


def test_cuda_graphs_and_precision_knobs_are_validated():
    from sparse_policy_node.core.config import ConfigError
    with pytest.raises(ConfigError, match='precision'):
        RuntimeConfig(precision='float64')
    with pytest.raises(ConfigError, match='cuda_graphs'):
        RuntimeConfig(cuda_graphs=1)
    assert RuntimeConfig().precision == 'float32' and RuntimeConfig().cuda_graphs is True


def test_precision_change_starts_over_dense(tiny_policy):
    # Cached branch outputs are in the old dtype: the next chunk recomputes everything.
    rt = RuntimeConfig(gate_source='static', target_sparsity=0.5, num_inference_steps=10)
    engine = SparseEngine(tiny_policy, None, rt)
    obs = make_obs(tiny_policy)
    dense = [engine.predict_action(obs)['stats']['dense'] for _ in range(2)]
    engine.set_runtime(RuntimeConfig(gate_source='static', target_sparsity=0.5,
                                     num_inference_steps=10, precision='bfloat16'))
    dense += [engine.predict_action(obs)['stats']['dense'] for _ in range(2)]
    engine.close()
    assert dense == [True, False, True, False]
