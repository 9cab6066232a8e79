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


# ==== issue 14: the CUDA path matches CPU and never waits on the host in the loop ====

def _cuda_copy(policy):
    import copy
    return copy.deepcopy(policy).to('cuda').eval()


def _chunks(engine, policy, device, n=3, seed=0):
    """Return n consecutive chunks of one engine on fixed windows and noise (host)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        obs = {k: v.to(device) for k, v in make_obs(policy, seed=i).items()}
        shape = policy.action_shape(1)
        noise = torch.randn(shape, generator=g).to(device)
        step_noise = torch.randn((10, *shape), generator=g).to(device)
        out.append(engine.predict_action(obs, noise=noise, step_noise=step_noise)
                   ['action_pred'].cpu())
    return torch.cat(out)


@pytest.fixture
def no_tf32():
    # cuDNN convolutions default to TF32 on recent GPUs; parity with CPU is checked in full
    # float32 (TF32 alone moves the vision features by ~1e-3).
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize('knobs', [{'sparsity_enabled': False},
                                   {'gate_source': 'static', 'target_sparsity': 0.5},
                                   {'gate_source': 'random', 'target_sparsity': 0.7}])
def test_dense_and_sparse_chunks_match_cpu(tiny_policy, no_tf32, knobs):
    rt = RuntimeConfig(num_inference_steps=10, **knobs)
    cpu = _chunks(SparseEngine(tiny_policy, None, rt), tiny_policy, 'cpu')
    gpu_policy = _cuda_copy(tiny_policy)
    gpu = _chunks(SparseEngine(gpu_policy, None, rt), gpu_policy, 'cuda')
    assert torch.allclose(gpu, cpu, atol=1e-4, rtol=1e-4), (gpu - cpu).abs().max()


@pytest.mark.parametrize('knobs', [{'gate_source': 'pruner'},
                                   {'gate_source': 'pruner', 'target_sparsity': 0.6,
                                    'rollout_max_age': 1},
                                   {'gate_source': 'static', 'target_sparsity': 0.5},
                                   {'sparsity_enabled': False}])
def test_denoising_loop_never_synchronises(tiny_policy, monkeypatch, knobs):
    from sparse_policy_node.core import engine as engine_module
    gpu_policy = _cuda_copy(tiny_policy)
    torch.manual_seed(0)
    pruner = Pruner(PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32),
                    gpu_policy.transformer.num_units,
                    gpu_policy.config.transformer.n_emb).to('cuda').eval()
    loop, waits = engine_module.sample_sparse, []

    def strict(model, scheduler, kv_all, noise, gates_fn, *args, **kwargs):
        def gates_once():  # the one allowed wait, before step 1
            torch.cuda.set_sync_debug_mode(0)
            waits.append(1)
            try:
                return gates_fn()
            finally:
                torch.cuda.set_sync_debug_mode('error')
        torch.cuda.set_sync_debug_mode('error')
        try:
            return loop(model, scheduler, kv_all, noise,
                        None if gates_fn is None else gates_once, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(engine_module, 'sample_sparse', strict)
    rt = RuntimeConfig(num_inference_steps=10, cuda_graphs=False, **knobs)  # the eager loop
    engine = SparseEngine(gpu_policy, pruner, rt)
    obs = {k: v.cuda() for k, v in make_obs(gpu_policy).items()}
    for _ in range(3):  # noise drawn by the engine, on the device
        out = engine.predict_action(obs)
        assert torch.isfinite(out['action']).all()
    assert len(waits) == 2  # chunks 1 and 2 (chunk 0 is dense)


def test_device_noise_follows_torch_manual_seed(tiny_policy):
    gpu_policy = _cuda_copy(tiny_policy)
    obs = {k: v.cuda() for k, v in make_obs(gpu_policy).items()}
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        rt = RuntimeConfig(sparsity_enabled=False, num_inference_steps=10)
        engine = SparseEngine(gpu_policy, None, rt)
        runs.append(torch.cat([engine.predict_action(obs)['action_pred'] for _ in range(2)]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][0], runs[0][1])  # each chunk draws fresh noise


def _gpu_pruner(policy):
    torch.manual_seed(0)
    return Pruner(PrunerConfig(hidden_dim=16, n_head=2, dim_feedforward=32),
                  policy.transformer.num_units,
                  policy.config.transformer.n_emb).to('cuda').eval()


@pytest.mark.parametrize('knobs', [{'sparsity_enabled': False},
                                   {'gate_source': 'static', 'target_sparsity': 0.5},
                                   {'gate_source': 'random', 'target_sparsity': 0.7},
                                   {'gate_source': 'pruner'},
                                   {'gate_source': 'pruner', 'target_sparsity': 0.6,
                                    'rollout_max_age': 2}])
@pytest.mark.parametrize('form', ['whole', 'step'])
def test_cuda_graph_chunks_match_eager(tiny_policy, knobs, form):
    from sparse_policy_node.core.chunk_graph import conditional_nodes
    gpu_policy = _cuda_copy(tiny_policy)
    pruner = _gpu_pruner(gpu_policy)
    eager = SparseEngine(gpu_policy, pruner, RuntimeConfig(num_inference_steps=10,
                                                           cuda_graphs=False, **knobs))
    graphed = SparseEngine(gpu_policy, pruner, RuntimeConfig(num_inference_steps=10,
                                                             cuda_graphs=True, **knobs))
    graphed.graph_form = form
    whole = form == 'whole' and conditional_nodes(torch.device('cuda'))[0]
    for engine in (eager, graphed):
        engine.random_generator.manual_seed(0)
    # Same windows every chunk: step patterns repeat, so later chunks replay captured graphs.
    a = _chunks(eager, gpu_policy, 'cuda', n=6)
    b = _chunks(graphed, gpu_policy, 'cuda', n=6)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    (mode, graphs), = graphed._graphs.items()
    sparse_form = 'chunk' if whole else 'steps'
    assert mode[0] == ('dense' if knobs.get('sparsity_enabled') is False else sparse_form)
    if mode[0] == 'chunk':
        assert graphs.graph is not None  # captured, with conditional nodes
    if mode[0] == 'steps' and knobs['gate_source'] != 'random':
        assert graphs.captures > 0 and graphs.graphs
    for engine in (eager, graphed):  # after a reset the graph is replayed, caches refilled
        engine.reset()
    a = _chunks(eager, gpu_policy, 'cuda', n=3, seed=1)
    b = _chunks(graphed, gpu_policy, 'cuda', n=3, seed=1)
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize('precision', ['float16', 'bfloat16'])
def test_reduced_precision_on_cuda_is_close_to_float32(tiny_policy, precision):
    gpu_policy = _cuda_copy(tiny_policy)
    dense = RuntimeConfig(sparsity_enabled=False, num_inference_steps=10, cuda_graphs=False)
    ref = _chunks(SparseEngine(gpu_policy, None, dense), gpu_policy, 'cuda')
    rt = RuntimeConfig(sparsity_enabled=False, num_inference_steps=10, precision=precision,
                       cuda_graphs=True)
    low = _chunks(SparseEngine(gpu_policy, None, rt), gpu_policy, 'cuda')
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_step_graphs_never_synchronise(tiny_policy, monkeypatch):
    from sparse_policy_node.core import cuda_graphs
    gpu_policy = _cuda_copy(tiny_policy)
    run, waits = cuda_graphs.StepGraphs.run, []

    def strict(self, kv_all, noise, step_noise, gates_fn, *args, **kwargs):
        def gates_once():  # the one allowed wait, before step 1
            torch.cuda.set_sync_debug_mode(0)
            waits.append(1)
            try:
                return gates_fn()
            finally:
                torch.cuda.set_sync_debug_mode('error')
        torch.cuda.set_sync_debug_mode('error')
        try:
            return run(self, kv_all, noise, step_noise,
                       None if gates_fn is None else gates_once, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(cuda_graphs.StepGraphs, 'run', strict)
    rt = RuntimeConfig(gate_source='pruner', target_sparsity=0.6, num_inference_steps=10,
                       cuda_graphs=True)
    engine = SparseEngine(gpu_policy, _gpu_pruner(gpu_policy), rt)
    engine.graph_form = 'step'
    obs = {k: v.cuda() for k, v in make_obs(gpu_policy).items()}
    for _ in range(4):  # eager first sights, captures, then replays: none may sync
        assert torch.isfinite(engine.predict_action(obs)['action']).all()
    assert len(waits) == 3


def test_switching_graphs_off_starts_over_dense(tiny_policy):
    gpu_policy = _cuda_copy(tiny_policy)
    rt = RuntimeConfig(gate_source='static', target_sparsity=0.5, num_inference_steps=10,
                       cuda_graphs=True)
    engine = SparseEngine(gpu_policy, None, rt)
    obs = {k: v.cuda() for k, v in make_obs(gpu_policy).items()}
    dense = [engine.predict_action(obs)['stats']['dense'] for _ in range(2)]
    engine.set_runtime(RuntimeConfig(gate_source='static', target_sparsity=0.5,
                                     num_inference_steps=10, cuda_graphs=False))
    dense += [engine.predict_action(obs)['stats']['dense'] for _ in range(2)]
    # The cache slots pointed into the graphs' buffers: the eager path does not read them.
    assert dense == [True, False, True, False]


def test_graphs_capture_while_another_thread_encodes_frames(tiny_policy):
    # The node encodes camera frames on arrival in another thread, on the default stream,
    # while the inference thread may be capturing a graph (thread-local capture mode).
    import threading
    gpu_policy = _cuda_copy(tiny_policy)
    results = {}
    for graphs in (False, True):
        rt = RuntimeConfig(gate_source='pruner', target_sparsity=0.6, num_inference_steps=10,
                           cuda_graphs=graphs)
        engine = SparseEngine(gpu_policy, _gpu_pruner(gpu_policy), rt)
        stop, errors = threading.Event(), []

        def encode():
            g = torch.Generator().manual_seed(1)
            i = 0
            while not stop.is_set():
                image = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8)
                try:
                    engine.encode_frame('agentview_image', ('bg', i), image.cuda())
                except Exception as exc:  # reported below
                    errors.append(exc)
                    return
                i += 1

        worker = threading.Thread(target=encode)
        worker.start()
        try:
            results[graphs] = _chunks(engine, gpu_policy, 'cuda', n=6)
        finally:
            stop.set()
            worker.join()
        assert not errors, errors
    assert torch.allclose(results[True], results[False], atol=1e-5, rtol=1e-5)


# ==== issue 24: the whole-chunk sparse graph (conditional nodes) ====

def _needs_conditional_nodes():
    from sparse_policy_node.core.chunk_graph import conditional_nodes
    ok, why = conditional_nodes(torch.device('cuda'))
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize('knobs', [{'gate_source': 'pruner'},
                                   {'gate_source': 'pruner', 'target_sparsity': 0.6,
                                    'rollout_max_age': 1}])
def test_whole_chunk_graph_replays_never_synchronise(tiny_policy, monkeypatch, knobs):
    from sparse_policy_node.core import chunk_graph
    _needs_conditional_nodes()
    gpu_policy = _cuda_copy(tiny_policy)
    run, replays = chunk_graph.SparseChunkGraph.run, []

    def strict(self, *args, **kwargs):
        if self.graph is None:
            return run(self, *args, **kwargs)
        replays.append(1)
        torch.cuda.set_sync_debug_mode('error')
        try:
            return run(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(chunk_graph.SparseChunkGraph, 'run', strict)
    engine = SparseEngine(gpu_policy, _gpu_pruner(gpu_policy),
                          RuntimeConfig(num_inference_steps=10, **knobs))
    obs = {k: v.cuda() for k, v in make_obs(gpu_policy).items()}
    for _ in range(4):
        assert torch.isfinite(engine.predict_action(obs)['action']).all()
    assert engine._cache_mode[0] == 'chunk' and len(replays) == 4


def test_whole_chunk_graph_falls_back_to_step_graphs_when_capture_fails(tiny_policy,
                                                                        monkeypatch):
    from sparse_policy_node.core import chunk_graph
    gpu_policy = _cuda_copy(tiny_policy)

    def broken(self, device):
        raise RuntimeError('no conditional nodes here')

    monkeypatch.setattr(chunk_graph.SparseChunkGraph, '_capture', broken)
    monkeypatch.setattr(chunk_graph, 'conditional_nodes', lambda device: (True, ''))
    rt = RuntimeConfig(gate_source='static', target_sparsity=0.5, num_inference_steps=10)
    engine = SparseEngine(gpu_policy, None, rt)
    reference = SparseEngine(gpu_policy, None, rt.replace(cuda_graphs=False))
    a = _chunks(engine, gpu_policy, 'cuda', n=3)
    b = _chunks(reference, gpu_policy, 'cuda', n=3)
    assert 'capture failed' in engine._graph_fallback
    assert engine._cache_mode[0] == 'steps'
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
