"""TensorRT backend: engines built from the exported ONNX graphs, run behind the same drop-ins.

A thin layer on purpose. :func:`load_trt_graphs` turns the graphs of :mod:`onnx_export` into
serialized engines (one per graph, with an optimization profile for every dynamic axis),
caches them next to the ONNX graphs in a folder keyed by the TensorRT version, the precision
and the GPU name, and returns one runner per graph for :func:`ort_backend.graph_pieces`.

What TensorRT itself does sits behind :class:`EngineBuilder` (build an engine, open a runner),
injected for tests. **Untested here**: :class:`TensorRTBuilder` and :class:`TrtRunner`, the
only code that calls ``tensorrt``, have never run (TensorRT cannot be installed on the
machines this package was developed on); the cache, the keys, the profiles, the manifest and
the plumbing into the engine are tested with a fake builder whose "engines" run on ONNX
Runtime.
"""

import json
import os
import re
import threading
from typing import Dict
from typing import List
from typing import Optional
from typing import Tuple

from sparse_policy_node.core.config import ConfigError
import torch

TRT_PRECISIONS = ('float32', 'float16')
TRT_MANIFEST = 'trt_manifest.json'
# Largest sizes the engines' optimization profiles admit (min, opt, max per dynamic axis).
MAX_BATCH = 16  # B: batched evaluation; the node runs batch 1
MAX_STEPS = 1000  # K: time tokens and the pruner, any schedule up to DDPM-1000
MAX_FRAMES = 64  # N: camera frames encoded in one call

Shape = Tuple[int, ...]


def import_tensorrt():
    """Return the ``tensorrt`` module, or raise ConfigError saying what is missing."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ConfigError(f'backend tensorrt needs the tensorrt Python package (NVIDIA '
                          f'TensorRT 8.6 or newer, with a CUDA GPU), which is not importable '
                          f'here ({exc}); use backend torch, or onnxruntime on the CPU') from exc
    return tensorrt


def check_tensorrt(device) -> None:
    """Raise ConfigError unless TensorRT is importable and ``device`` is a CUDA device."""
    if not str(device).startswith('cuda'):
        raise ConfigError(f'backend tensorrt runs on a CUDA device, not {str(device)!r}; set '
                          f'device cuda, or use backend onnxruntime on the CPU')
    import_tensorrt()


class EngineBuilder:
    """What the layer needs from TensorRT; :class:`TensorRTBuilder` is the real one."""

    version = 'none'

    def device_name(self, device) -> str:
        """Name of the GPU engines are built for (part of the cache key)."""
        raise NotImplementedError

    def build(self, onnx_path: str, profile: Dict[str, Tuple[Shape, Shape, Shape]],
              precision: str) -> bytes:
        """Build a serialized engine of one ONNX graph for the given input shape ranges."""
        raise NotImplementedError

    def runner(self, engine: bytes, device):
        """Open a serialized engine as a callable ``(*tensors) -> [tensors]``."""
        raise NotImplementedError


def _slug(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9.]+', '_', text).strip('_')


def engine_key(manifest: dict, version: str, precision: str, gpu: str) -> str:
    """Cache folder name: weights digest, TensorRT version, precision, GPU name."""
    return (f'trt-{manifest["weights_sha256"][:16]}-trt{_slug(version)}-{precision}-'
            f'{_slug(gpu)}')


def profile_for(graph: dict, model: dict) -> Dict[str, Tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input of one manifest graph entry.

    Optimized for what the node runs: batch 1, T_c memory tokens, T_o frames, 100 steps.
    """
    T_c = 1 + model['n_obs_steps']
    ranges = {'B': (1, 1, MAX_BATCH), 'K': (1, 100, MAX_STEPS),
              'N': (1, T_c, MAX_STEPS) if graph['file'] == 'memory_kv.onnx'
              else (1, model['n_obs_steps'], MAX_FRAMES)}
    profile = {}
    for spec in graph['inputs']:
        dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in spec['shape']]
        profile[spec['name']] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return profile


def build_engines(onnx_dir: str, manifest: dict, out_dir: str, precision: str,
                  builder: EngineBuilder, gpu: str) -> Dict[str, str]:
    """Build (or find cached) engines of every graph into ``out_dir``; return name -> path."""
    if precision not in TRT_PRECISIONS:
        raise ConfigError(f'TensorRT precision must be one of {TRT_PRECISIONS}, '
                          f'got {precision!r}')
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, graph in manifest['graphs'].items():
        path = os.path.join(out_dir, name + '.engine')
        if not os.path.isfile(path):
            try:
                data = builder.build(os.path.join(onnx_dir, graph['file']),
                                     profile_for(graph, manifest['model']), precision)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: B902 - re-raised with the graph's name
                raise ConfigError(f'TensorRT could not build graph {name!r}: {exc}') from exc
            with open(path + '.tmp', 'wb') as f:
                f.write(data)
            os.replace(path + '.tmp', path)
        paths[name] = path
    with open(os.path.join(out_dir, TRT_MANIFEST), 'w') as f:
        json.dump({'tensorrt': builder.version, 'precision': precision, 'gpu': gpu,
                   'weights_sha256': manifest['weights_sha256'], 'onnx_dir': onnx_dir,
                   'engines': {n: os.path.basename(p) for n, p in paths.items()}}, f, indent=1)
    return paths


def load_trt_graphs(onnx_dir: str, manifest: dict, device, precision: str = 'float32',
                    builder: Optional[EngineBuilder] = None):
    """Return (engine folder, {graph name: runner}), building engines not cached yet.

    The engine folder sits next to ``onnx_dir`` (the model's backend cache).
    """
    builder = builder or TensorRTBuilder()
    gpu = builder.device_name(device)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(onnx_dir)),
                           engine_key(manifest, builder.version, precision, gpu))
    paths = build_engines(onnx_dir, manifest, out_dir, precision, builder, gpu)
    graphs = {}
    for name, path in paths.items():
        with open(path, 'rb') as f:
            graphs[name] = builder.runner(f.read(), device)
    return out_dir, graphs


# ==== the only code that touches TensorRT (untested: see the module docstring) ====


class TensorRTBuilder(EngineBuilder):
    """Builds and opens engines with the ``tensorrt`` package (TensorRT 8.6 / 10 API)."""

    def __init__(self):
        self.trt = import_tensorrt()
        self.version = self.trt.__version__
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)

    def device_name(self, device) -> str:
        """Return torch's name of the CUDA device."""
        return torch.cuda.get_device_name(torch.device(device))

    def build(self, onnx_path: str, profile: Dict[str, Tuple[Shape, Shape, Shape]],
              precision: str) -> bytes:
        """Parse the ONNX file and build a serialized engine with one optimization profile."""
        trt = self.trt
        builder = trt.Builder(self.logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, 'EXPLICIT_BATCH'):  # TensorRT < 10
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(onnx_path):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError(f'ONNX parser: {errors}')
        config = builder.create_builder_config()
        shapes = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            shapes.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(shapes)
        if precision == 'float16':
            config.set_flag(trt.BuilderFlag.FP16)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError('build_serialized_network returned None (see the TensorRT log)')
        return bytes(engine)

    def runner(self, engine: bytes, device):
        """Deserialize an engine into a :class:`TrtRunner` on ``device``."""
        return TrtRunner(self.trt, self.trt.Runtime(self.logger).deserialize_cuda_engine(engine),
                         torch.device(device))


class TrtRunner:
    """One engine with its execution context, called with and returning CUDA tensors."""

    def __init__(self, trt, engine, device: torch.device):
        self.trt, self.engine, self.device = trt, engine, device
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = [engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.inputs = [n for n, i in zip(names, is_input) if i]
        self.outputs = [n for n, i in zip(names, is_input) if not i]
        self.dtypes = {n: self._torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self._lock = threading.Lock()  # a context runs one call at a time

    def _torch_dtype(self, dtype):
        trt = self.trt
        return {trt.float32: torch.float32, trt.float16: torch.float16,
                trt.int32: torch.int32, getattr(trt, 'int64', trt.int32): torch.int64}[dtype]

    def __call__(self, *tensors: torch.Tensor) -> List[torch.Tensor]:
        """Run the engine on the current CUDA stream; outputs are new tensors."""
        with self._lock:
            held = []
            for name, t in zip(self.inputs, tensors):
                t = t.to(self.device, self.dtypes[name]).contiguous()
                held.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = []
            for name in self.outputs:
                out = torch.empty(tuple(self.context.get_tensor_shape(name)),
                                  dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, out.data_ptr())
                outs.append(out)
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError('TensorRT execute_async_v3 failed')
            for t in held:
                t.record_stream(stream)
            return [o.float() if o.dtype == torch.float16 else o for o in outs]
