"""ONNX export, the ONNX Runtime backend and the TensorRT layer (with a fake builder).

Parity is checked against the torch modules on the CPU at 1e-5, graph by graph and for whole
sparse chunks through the unchanged engine loop. The graphs of the tiny policy are exported
once per module (a few seconds).
"""

import json
import os
import sys

from conftest import make_obs
import pytest
from sparse_policy_node.core import backends
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.config import tiny_config
from sparse_policy_node.core.engine import SparseEngine
from sparse_policy_node.core.onnx_export import ExportError
from sparse_policy_node.core.onnx_export import read_manifest
from sparse_policy_node.core.policy import DiffusionPolicy
from sparse_policy_node.core.pruner import Pruner
from sparse_policy_node.core.tensorrt_backend import EngineBuilder
from sparse_policy_node.core.tensorrt_backend import load_trt_graphs
import torch

pytest.importorskip('onnxruntime')
TOL = 1e-5


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    """Tiny policy + pruner, and its exported graphs: (policy, pruners, directory, manifest)."""
    torch.manual_seed(0)
    policy = DiffusionPolicy(tiny_config()).eval()
    pruner = Pruner(PrunerConfig(), policy.transformer.num_units,
                    policy.config.transformer.n_emb).eval()
    pruners = {('ddpm', 10): pruner}
    directory, manifest = backends.ensure_onnx(policy, pruners,
                                               str(tmp_path_factory.mktemp('model')))
    return policy, pruners, directory, manifest


def close(a, b):
    return (a - b).abs().max().item() <= TOL


def test_manifest_lists_every_graph_with_shapes_opset_and_versions(model):
    policy, pruners, directory, manifest = model
    assert manifest == read_manifest(directory)
    assert manifest['opset'] == 17 and manifest['torch'] == torch.__version__
    assert manifest['layout'] == 'unit' and len(manifest['weights_sha256']) == 64
    units = [f'unit_l{layer}_{kind}' for layer in range(2) for kind in ('sa', 'ca', 'ffn')]
    assert set(manifest['graphs']) == {'vision_agentview', 'obs_tokens', 'time_tokens',
                                       'memory_kv', 'embed', 'head', 'pruner_ddpm-10', *units}
    ca = manifest['graphs']['unit_l0_ca']
    assert [i['name'] for i in ca['inputs']] == ['x', 'k', 'v']
    assert ca['inputs'][0]['shape'] == ['B', 6, 32] and ca['inputs'][1]['shape'] == ['B', 2, 3, 16]
    assert manifest['graphs']['pruner_ddpm-10']['schedule'] == ['ddpm', 10]
    import onnx
    graph = onnx.load(os.path.join(directory, 'unit_l0_ca.onnx'))
    assert graph.opset_import[0].version == 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'B'  # dynamic batch


def test_every_graph_matches_torch_at_1e_5_with_a_dynamic_batch(model):
    policy, pruners, directory, manifest = model
    ort = backends.make_backend('onnxruntime', policy, pruners)
    m, g = policy.transformer, ort.transformer
    B = 3  # exported at batch 1
    g_ = torch.Generator().manual_seed(1)
    x = torch.randn(B, 6, 32, generator=g_)
    cond = torch.randn(B, 2, policy.config.obs.obs_feature_dim, generator=g_)
    steps = torch.tensor([9, 7, 4, 2, 0])  # K = 5, exported at 3
    with torch.no_grad():
        time_mem, obs_mem = m.encode_condition_parts(steps, cond)
        assert close(g.encode_time_tokens(steps), time_mem)
        assert close(g.encode_obs_tokens(cond), obs_mem)
        kv, kv_g = m.memory_kv_all_steps(time_mem, obs_mem), g.memory_kv_all_steps(time_mem,
                                                                                   obs_mem)
        for (k, v), (k_g, v_g) in zip(kv, kv_g):
            assert close(k, k_g) and close(v, v_g)
        for layer in range(2):
            k, v = kv[layer][0][:, 3], kv[layer][1][:, 3]
            assert close(g.unit(layer, 0, x), m.unit(layer, 0, x))
            assert close(g.unit(layer, 1, x, kv=(k, v)), m.unit(layer, 1, x, kv=(k, v)))
            assert close(g.unit(layer, 2, x), m.unit(layer, 2, x))
        sample = torch.randn(B, 6, 7, generator=g_)
        assert close(g.embed_sample(sample), m.embed_sample(sample))
        assert close(g.output(x), m.output(x))
        pruner = pruners['ddpm', 10]
        assert close(ort.pruners['ddpm', 10](time_mem, obs_mem), pruner(time_mem, obs_mem))
        images = torch.randint(0, 256, (5, 3, 32, 32), generator=g_, dtype=torch.uint8)
        assert close(ort.cameras.encode_camera('agentview', images),
                     policy.obs_encoder.encode_camera('agentview', images))


def chunks(engine, policy, n, batch=1):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        noise = torch.randn(batch, 6, 7, generator=g)
        step_noise = torch.randn(10, batch, 6, 7, generator=g)
        out.append(engine.predict_action(make_obs(policy, batch, seed=i), noise=noise,
                                         step_noise=step_noise))
    return out


@pytest.mark.parametrize('knobs', [{'target_sparsity': -1.0}, {'target_sparsity': 0.7},
                                   {'sparsity_enabled': False}])
def test_engine_chunks_through_onnxruntime_match_torch(model, knobs):
    """Same sparse loop, pieces swapped: actions and executed gates agree over 4 chunks."""
    policy, pruners, _, _ = model
    rt = RuntimeConfig(sampler='ddpm', num_inference_steps=10, **knobs)
    ref = SparseEngine(policy, pruners, rt)
    ort = SparseEngine(policy, pruners, RuntimeConfig(**{**vars(rt), 'backend': 'onnxruntime'}))
    assert type(ort.backend_for(ort.runtime).transformer).__name__ == 'GraphTransformer'
    for a, b in zip(chunks(ref, policy, 4), chunks(ort, policy, 4)):
        assert close(a['action_pred'], b['action_pred'])
        assert a['stats']['realized_sparsity'] == b['stats']['realized_sparsity']
    assert torch.equal(ref.last_gates, ort.last_gates)
    for a, b in zip(chunks(ref, policy, 2, batch=2), chunks(ort, policy, 2, batch=2)):
        assert close(a['action_pred'], b['action_pred'])  # batched soft path


def test_frames_encoded_on_arrival_use_the_backend(model):
    policy, pruners, _, _ = model
    rt = RuntimeConfig(sampler='ddpm', num_inference_steps=10, backend='onnxruntime')
    engine = SparseEngine(policy, pruners, rt)
    obs = make_obs(policy, seed=3)
    for t in range(2):
        engine.encode_frame('agentview_image', ('e', t), obs['agentview_image'][0, t])
    out = engine.predict_action(obs, frame_ids={'agentview_image': [('e', 0), ('e', 1)]})
    assert out['stats']['frames_encoded'] == 0
    ref = SparseEngine(policy, pruners, RuntimeConfig(**{**vars(rt), 'backend': 'torch'}))
    noise = torch.zeros(1, 6, 7)
    engine.reset()
    assert close(engine.predict_action(obs, noise=noise, step_noise=torch.zeros(10, 1, 6, 7))
                 ['action_pred'], ref.predict_action(obs, noise=noise, step_noise=torch.zeros(
                     10, 1, 6, 7))['action_pred'])


def test_runtime_switch_builds_the_backend_before_the_next_chunk(model, monkeypatch):
    policy, pruners, _, _ = model
    engine = SparseEngine(policy, pruners, RuntimeConfig(sampler='ddpm',
                                                         num_inference_steps=10))
    engine.set_runtime(RuntimeConfig(sampler='ddpm', num_inference_steps=10,
                                     backend='onnxruntime'))
    # Built by set_runtime: a chunk never exports or opens sessions.
    monkeypatch.setattr(backends, 'make_backend', lambda *a, **k: pytest.fail('built late'))
    out = chunks(engine, policy, 2)
    assert torch.isfinite(out[-1]['action_pred']).all()


def test_graphs_are_cached_next_to_the_model_and_keyed_by_the_weights(model, tmp_path,
                                                                      monkeypatch):
    policy, pruners, directory, manifest = model
    assert os.path.basename(os.path.dirname(directory)) == '.backend_cache'
    assert os.path.basename(directory).startswith(f'onnx-{manifest["weights_sha256"][:16]}-')
    assert 'ort' in os.path.basename(directory) and 'opset17' in os.path.basename(directory)
    import sparse_policy_node.core.onnx_export as onnx_export
    monkeypatch.setattr(onnx_export, 'export_onnx', lambda *a: pytest.fail('exported again'))
    assert backends.ensure_onnx(policy, pruners, os.path.dirname(os.path.dirname(directory))) \
        == (directory, manifest)
    other = DiffusionPolicy(tiny_config()).eval()  # other weights: another key
    assert backends.onnx_key(onnx_export.weights_sha256(other, pruners)) != \
        os.path.basename(directory)


def test_read_only_model_directory_falls_back_to_the_temp_directory(tmp_path, monkeypatch):
    model_dir = tmp_path / 'model'
    model_dir.mkdir()
    os.chmod(model_dir, 0o500)
    monkeypatch.setattr(backends.tempfile, 'gettempdir', lambda: str(tmp_path / 'tmp'))
    try:
        root = backends.cache_root(str(model_dir))
    finally:
        os.chmod(model_dir, 0o700)
    if os.geteuid() != 0:  # root writes anywhere
        assert root.startswith(str(tmp_path / 'tmp'))
    assert backends.cache_root(None).startswith(str(tmp_path / 'tmp'))


def test_stale_or_foreign_graphs_are_refused_by_the_manifest(model, tmp_path):
    policy, pruners, directory, manifest = model
    from sparse_policy_node.core.onnx_export import check_manifest
    other = DiffusionPolicy(tiny_config()).eval()
    with pytest.raises(ExportError, match='other weights'):
        check_manifest(manifest, other, pruners)
    with pytest.raises(ExportError, match='no readable ONNX manifest'):
        read_manifest(str(tmp_path))
    (tmp_path / 'manifest.json').write_text(json.dumps({**manifest}))
    with pytest.raises(ExportError, match='missing'):
        read_manifest(str(tmp_path))


def test_missing_onnxruntime_is_a_config_error_naming_the_package(tiny_policy, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import fails
    with pytest.raises(ConfigError, match='onnxruntime package'):
        backends.check_backend('onnxruntime', 'cpu')
    with pytest.raises(ConfigError, match='onnxruntime package'):
        SparseEngine(tiny_policy, None, RuntimeConfig(sparsity_enabled=False,
                                                      num_inference_steps=10,
                                                      backend='onnxruntime'))


def test_auto_without_the_exporter_serves_torch_and_export_says_what_is_missing(
        tiny_policy, tmp_path, monkeypatch):
    """A fresh clone once failed its demo: auto picked onnxruntime, whose export needs onnx."""
    assert backends.resolve_backend('auto', 'cpu') == 'onnxruntime'
    monkeypatch.setitem(sys.modules, 'onnx', None)  # import fails
    assert backends.missing_onnx_modules() == ['onnx']
    assert backends.resolve_backend('auto', 'cpu') == 'torch'
    with pytest.raises(ConfigError, match='needs the onnx package.*requirements/runtime.txt'):
        backends.ensure_onnx(tiny_policy, None, str(tmp_path))


def test_backend_validation_names_field_value_and_device(tiny_policy):
    with pytest.raises(ConfigError, match=r"RuntimeConfig.backend must be one of .*'tvm'"):
        RuntimeConfig(backend='tvm')
    with pytest.raises(ConfigError, match='runs on the CPU'):
        backends.check_backend('onnxruntime', 'cuda')
    with pytest.raises(ConfigError, match='CUDA device'):
        backends.check_backend('tensorrt', 'cpu')
    engine = SparseEngine(tiny_policy, None, RuntimeConfig(sparsity_enabled=False,
                                                           num_inference_steps=10))
    with pytest.raises(ConfigError, match='float32'):
        engine.check_runtime(RuntimeConfig(sparsity_enabled=False, num_inference_steps=10,
                                           backend='onnxruntime', precision='float16'))


# ==== TensorRT layer, with a fake builder ====


class FakeBuilder(EngineBuilder):
    """Records builds; its "engine" is the ONNX file, run by ONNX Runtime."""

    version = '10.9.0'

    def __init__(self, tmp):
        self.built, self.tmp = [], tmp

    def device_name(self, device):
        return 'NVIDIA Fake GPU 80GB'

    def build(self, onnx_path, profile, precision):
        self.built.append((os.path.basename(onnx_path), profile, precision))
        with open(onnx_path, 'rb') as f:
            return b'FAKE' + f.read()

    def runner(self, engine, device):
        from sparse_policy_node.core.ort_backend import OrtGraph
        assert engine.startswith(b'FAKE')
        path = os.path.join(self.tmp, f'{len(os.listdir(self.tmp))}.onnx')
        with open(path, 'wb') as f:
            f.write(engine[4:])
        return OrtGraph(path, 1)


def test_tensorrt_engines_are_built_once_per_version_precision_and_gpu(model, tmp_path):
    policy, pruners, directory, manifest = model
    builder = FakeBuilder(str(tmp_path))
    engine_dir, graphs = load_trt_graphs(directory, manifest, 'cpu', 'float16', builder)
    assert os.path.dirname(engine_dir) == os.path.dirname(directory)  # next to the graphs
    assert os.path.basename(engine_dir) == (f'trt-{manifest["weights_sha256"][:16]}-trt10.9.0-'
                                            f'float16-NVIDIA_Fake_GPU_80GB')
    assert len(builder.built) == len(manifest['graphs']) and set(graphs) == set(
        manifest['graphs'])
    assert {p for _, _, p in builder.built} == {'float16'}
    profiles = {name: profile for name, profile, _ in builder.built}
    assert profiles['unit_l0_ca.onnx']['k'] == ((1, 2, 3, 16), (1, 2, 3, 16), (16, 2, 3, 16))
    assert profiles['time_tokens.onnx']['timesteps'] == ((1,), (100,), (1000,))
    assert profiles['memory_kv.onnx']['memory'][2] == (16, 1000, 32)
    saved = json.loads((tmp_path / engine_dir / 'trt_manifest.json').read_text())
    assert saved['tensorrt'] == '10.9.0' and saved['gpu'] == 'NVIDIA Fake GPU 80GB'
    load_trt_graphs(directory, manifest, 'cpu', 'float16', builder)
    assert len(builder.built) == len(manifest['graphs'])  # cached: nothing rebuilt
    load_trt_graphs(directory, manifest, 'cpu', 'float32', builder)
    assert len(builder.built) == 2 * len(manifest['graphs'])  # another precision: rebuilt
    # The engines' runners behind the drop-ins reproduce torch.
    from sparse_policy_node.core.ort_backend import graph_pieces
    transformer, _, trt_pruners = graph_pieces(policy, pruners, graphs)
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        assert close(transformer.unit(1, 2, x), policy.transformer.unit(1, 2, x))


def test_engine_serves_tensorrt_engines_through_the_same_loop(model, tmp_path, monkeypatch):
    """Backend tensorrt end to end in the engine, with the fake builder's engines on the CPU."""
    from sparse_policy_node.core import tensorrt_backend
    policy, pruners, _, _ = model
    builder = FakeBuilder(str(tmp_path))
    monkeypatch.setattr(tensorrt_backend, 'check_tensorrt', lambda device: None)
    monkeypatch.setattr(tensorrt_backend, 'TensorRTBuilder', lambda: builder)
    backends.forget(policy)
    rt = RuntimeConfig(sampler='ddpm', num_inference_steps=10, target_sparsity=0.7)
    ref = SparseEngine(policy, pruners, rt)
    trt = SparseEngine(policy, pruners, RuntimeConfig(**{**vars(rt), 'backend': 'tensorrt'}),
                       model_dir=str(tmp_path))  # a fresh cache: engines are built
    assert trt.backend_for(trt.runtime).name == 'tensorrt' and builder.built
    for a, b in zip(chunks(ref, policy, 3), chunks(trt, policy, 3)):
        assert close(a['action_pred'], b['action_pred'])
        assert b['stats']['backend'] == 'tensorrt'
    backends.forget(policy)


def test_tensorrt_build_failure_and_bad_precision_name_the_graph(model, tmp_path):
    policy, pruners, directory, manifest = model

    class Broken(FakeBuilder):
        version = '0.1'  # nothing cached for it

        def build(self, onnx_path, profile, precision):
            raise RuntimeError('unsupported operator Foo')

    with pytest.raises(ConfigError, match="could not build graph 'vision_agentview'.*Foo"):
        load_trt_graphs(directory, manifest, 'cpu', 'float32', Broken(str(tmp_path)))
    with pytest.raises(ConfigError, match='precision must be one of'):
        load_trt_graphs(directory, manifest, 'cpu', 'bfloat16', FakeBuilder(str(tmp_path)))


def test_missing_tensorrt_is_a_config_error_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorrt', None)
    with pytest.raises(ConfigError, match='tensorrt Python package'):
        backends.check_backend('tensorrt', 'cuda')


# ==== command line ====


def test_export_command_writes_graphs_and_a_manifest_naming_the_model(model, tmp_path, capsys):
    from sparse_policy_node.cli import main
    from sparse_policy_node.core.checkpoint import policy_sha256
    from sparse_policy_node.core.checkpoint import save_policy
    policy, _, _, _ = model
    save_policy(policy, str(tmp_path / 'model'))
    assert main(['export', str(tmp_path / 'model'), '--out', str(tmp_path / 'graphs')]) == 0
    manifest = read_manifest(str(tmp_path / 'graphs'))
    assert manifest['policy_sha256'] == policy_sha256(str(tmp_path / 'model'))
    assert json.loads(capsys.readouterr().out)['graphs'] == len(manifest['graphs']) == 12
    assert main(['export', str(tmp_path / 'nope')]) == 2
    assert 'export:' in capsys.readouterr().err


def test_export_tensorrt_without_tensorrt_names_what_is_missing(tmp_path, capsys, monkeypatch):
    from sparse_policy_node.cli import main
    monkeypatch.setitem(sys.modules, 'tensorrt', None)
    assert main(['export', str(tmp_path), '--format', 'tensorrt']) == 2
    assert 'tensorrt Python package' in capsys.readouterr().err
    assert main(['export', str(tmp_path), '--format', 'tensorrt', '--device', 'cpu']) == 2
    assert 'CUDA device' in capsys.readouterr().err


def test_bench_times_backends_side_by_side_in_one_process(capsys):
    from sparse_policy_node.cli import main
    assert main(['bench', '--preset', 'tiny', '--steps', '10', '--reps', '1', '--warmup', '0',
                 '--backend', 'torch', 'onnxruntime', '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['backend'] == 'torch' and set(result['backends']) == {'torch', 'onnxruntime'}
    ratios = result['backend_ratios']['onnxruntime/torch']
    assert ratios['sparse_ms'] > 0 and ratios['dense_ms'] > 0
    assert result['backends']['onnxruntime']['realized_sparsity'] == result['realized_sparsity']
