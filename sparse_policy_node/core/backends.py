"""Inference backends: who runs the model pieces the sparse loop calls.

``torch`` runs the modules themselves. ``onnxruntime`` and ``tensorrt`` run graphs exported
from the same weights (:mod:`onnx_export`) behind drop-ins with the same method signatures
(:mod:`ort_backend`), so the loop in :mod:`sparse_sampler`, the caches and the gates are one
code path for all three.

Graphs are built when the backend is made (engine construction, or a runtime change applied
between chunks), never inside a chunk, and cached on disk: in ``<model_dir>/.backend_cache/``
next to the model, or under the temp directory when that is not writable (or the model never
was on disk), in a folder keyed by the weights' SHA-256 and the versions that made them.
"""

import copy
from dataclasses import dataclass
import importlib
import os
import shutil
import tempfile
import threading
from typing import List
from typing import Optional
import weakref

from sparse_policy_node.core.config import BACKENDS
from sparse_policy_node.core.config import ConfigError
import torch

CACHE_DIR = '.backend_cache'


@dataclass
class Backend:
    """The pieces one backend runs.

    Args:
        name: one of :data:`BACKENDS`.
        transformer: :class:`DPTransformer` or a drop-in with its inference API.
        cameras: an object with ``encode_camera(camera, images)`` (:class:`ObsEncoder`).
        pruners: ``{(sampler, K) or None: pruner}``, callables ``(time_mem, obs_mem)``.
        directory: where its graphs (or engines) live; None for torch.
    """

    name: str
    transformer: object
    cameras: object
    pruners: dict
    directory: Optional[str] = None


def resolve_backend(name: str, device, precision: str = 'float32') -> str:
    """Return the backend ``'auto'`` stands for here (other names unchanged).

    ``auto`` is onnxruntime on the CPU in float32 when onnxruntime and onnx (the exporter
    that writes its graphs from the weights) are importable (it ran the sparse loop 1.3-2x
    faster than eager torch there, see docs), else torch; on CUDA it is torch, as the
    TensorRT path has not run on a GPU yet. Both are runtime dependencies
    (requirements/runtime.txt); the torch fallback keeps a partial install serving.
    """
    if name != 'auto':
        return name
    if str(device) != 'cpu' or precision != 'float32':
        return 'torch'
    if missing_onnx_modules():
        return 'torch'
    return 'onnxruntime'


def missing_onnx_modules() -> List[str]:
    """Names of the modules the onnxruntime backend needs that do not import here."""
    missing = []
    for module in ('onnxruntime', 'onnx'):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def check_backend(name: str, device: str) -> None:
    """Raise ConfigError naming what is missing when ``name`` cannot run on ``device``."""
    if name not in BACKENDS:
        raise ConfigError(f'backend must be one of {BACKENDS}, got {name!r}')
    device = str(device)
    name = resolve_backend(name, device)
    if name == 'onnxruntime':
        if device != 'cpu':
            raise ConfigError(f'backend onnxruntime runs on the CPU (CPUExecutionProvider), '
                              f'not on device {device!r}; use backend torch or tensorrt there')
        from sparse_policy_node.core.ort_backend import import_onnxruntime
        import_onnxruntime()
    elif name == 'tensorrt':
        from sparse_policy_node.core.tensorrt_backend import check_tensorrt
        check_tensorrt(device)


def cache_root(model_dir: Optional[str]) -> str:
    """``<model_dir>/.backend_cache`` when writable, else a folder under the temp directory."""
    if model_dir is not None:
        root = os.path.join(model_dir, CACHE_DIR)
        try:
            os.makedirs(root, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=root, prefix='.probe-')
            probe.close()
            return root
        except OSError:
            pass
    root = os.path.join(tempfile.gettempdir(), 'sparse_policy_node-' + CACHE_DIR.strip('.'))
    os.makedirs(root, exist_ok=True)
    return root


def onnx_key(weights_sha: str) -> str:
    """Cache folder name of exported graphs: weights digest, opset, exporter, runtime versions."""
    from sparse_policy_node.core.onnx_export import OPSET
    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:
        ort = 'none'
    return f'onnx-{weights_sha[:16]}-opset{OPSET}-torch{torch.__version__}-ort{ort}'


def ensure_onnx(policy, pruners: Optional[dict], model_dir: Optional[str] = None,
                out_dir: Optional[str] = None):
    """Return (directory, manifest) of the policy's graphs, exporting them if not cached.

    The export goes to a private folder renamed into place, so two processes exporting the
    same model at once both end with a complete folder.
    """
    from sparse_policy_node.core.checkpoint import policy_sha256
    from sparse_policy_node.core.onnx_export import check_manifest
    from sparse_policy_node.core.onnx_export import ExportError
    from sparse_policy_node.core.onnx_export import export_onnx
    from sparse_policy_node.core.onnx_export import read_manifest
    from sparse_policy_node.core.onnx_export import weights_sha256
    pruners = pruners or {}
    if out_dir is None:
        out_dir = os.path.join(cache_root(model_dir),
                               onnx_key(weights_sha256(policy, pruners)))
    try:
        manifest = read_manifest(out_dir)
        check_manifest(manifest, policy, pruners)
        return out_dir, manifest
    except ExportError:
        pass
    if 'onnx' in missing_onnx_modules():
        raise ConfigError('exporting the ONNX graphs of the onnxruntime backend needs the onnx '
                          'package, which is not importable here: pip install -r '
                          'requirements/runtime.txt, or use backend torch')
    source = None
    if model_dir is not None and os.path.isfile(os.path.join(model_dir, 'model.safetensors')):
        source = policy_sha256(model_dir)
    staging = tempfile.mkdtemp(prefix='.export-', dir=os.path.dirname(os.path.abspath(out_dir)))
    try:
        manifest = export_onnx(policy, pruners, staging, source)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)  # stale or incomplete
        try:
            os.rename(staging, out_dir)
        except OSError:  # another process finished first: keep theirs
            if not os.path.isfile(os.path.join(out_dir, 'manifest.json')):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir, manifest


_built = weakref.WeakKeyDictionary()  # policy -> {(backend, threads, pruner ids): Backend}
_built_lock = threading.Lock()


def forget(policy) -> None:
    """Drop the backends built for ``policy`` (after its weights changed in place)."""
    with _built_lock:
        _built.pop(policy, None)


def make_backend(name: str, policy, pruners: Optional[dict], device='cpu',
                 model_dir: Optional[str] = None, precision: str = 'float32') -> Backend:
    """Build (or reuse) backend ``name`` for ``policy`` and its pruners.

    Engines built on the same policy object share one backend (sessions are thread-safe), so
    a benchmark with several engines exports and loads the graphs once. ``precision`` is the
    TensorRT engines' (``float32`` or ``float16``); ONNX Runtime runs the float32 graphs.

    Raises:
        ConfigError: the backend cannot run here (see :func:`check_backend`) or its graphs
            are unusable.
    """
    pruners = pruners or {}
    check_backend(name, device)
    if name == 'torch':
        return Backend('torch', policy.transformer, policy.obs_encoder, pruners)
    pruner_ids = tuple(sorted((str(s), id(p)) for s, p in pruners.items()))
    key = (name, precision, torch.get_num_threads(), pruner_ids)
    with _built_lock:
        cached = _built.get(policy, {}).get(key)
    if cached is not None:
        return cached
    from sparse_policy_node.core.ort_backend import graph_pieces
    source, source_pruners = policy, pruners
    if next(policy.parameters()).device.type != 'cpu':  # export from a CPU copy
        source = copy.deepcopy(policy).cpu()
        source_pruners = {s: copy.deepcopy(p).cpu() for s, p in pruners.items()}
    directory, manifest = ensure_onnx(source, source_pruners, model_dir)
    if name == 'onnxruntime':
        from sparse_policy_node.core.ort_backend import load_ort_graphs
        graphs = load_ort_graphs(directory, manifest, torch.get_num_threads())
    else:
        from sparse_policy_node.core.tensorrt_backend import load_trt_graphs
        directory, graphs = load_trt_graphs(directory, manifest, device, precision)
    backend = Backend(name, *graph_pieces(policy, pruners, graphs), directory=directory)
    with _built_lock:
        _built.setdefault(policy, {})[key] = backend
    return backend
