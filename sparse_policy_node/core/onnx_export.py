"""ONNX export of the engine's pieces: one graph per piece the sparse loop calls.

Generic exporters fail on diffusion policies because the scheduler loop and the per-step
gating do not fit one graph. The engine already has the right cut, so each piece becomes its
own graph and the loop stays in Python (:mod:`sparse_sampler`, unchanged)::

    vision_<camera>   images (N, 3, H, W) float in [0, 255]     -> (N, F) features
    obs_tokens        cond (B, T_o, D_o)                         -> (B, T_o, D) memory tokens
    time_tokens       timesteps (K,) int64                       -> (K, D) memory time tokens
    memory_kv         memory (B, N, D)                           -> k_l, v_l (B, nh, N, dh) per l
    embed             sample (B, T_a, A)                         -> (B, T_a, D) residual stream
    unit_l<l>_sa      x (B, T_a, D)                              -> (B, T_a, D) branch output
    unit_l<l>_ca      x (B, T_a, D), k, v (B, nh, T_c, dh)       -> (B, T_a, D) branch output
    unit_l<l>_ffn     x (B, T_a, D)                              -> (B, T_a, D) branch output
    head              x (B, T_a, D)                              -> (B, T_a, A) predicted noise
    pruner[_<s>-<K>]  time_mem (K, D), obs_mem (B, T_o, D)       -> (B, K, U, 4) gate logits

One graph per unit, not one per layer with a unit selector: on the ``paper`` preset at batch 1
the per-layer graph (a nested ``If`` over the three unit graphs) ran each unit 1.6-2.0x slower
in ONNX Runtime than the per-unit graphs (fusions stop at subgraph boundaries; README,
"Backends"; ``docs/onnx_unit_vs_layer.py``). The batch axis (and N, K where they vary) is
dynamic. ``manifest.json``
lists every graph with its inputs and outputs, the opset, the weights' digest and the torch
version that wrote them.

Export uses torch's TorchScript-based exporter (``dynamo=False``): it needs no extra
package and traces these small straight-line functions exactly.
"""

import hashlib
import json
import os
from typing import Dict
from typing import List
from typing import Optional
import warnings

from sparse_policy_node.core.transformer import UNIT_KINDS
import torch
from torch import nn

OPSET = 17  # LayerNormalization is native from 17; TensorRT 8.6+ parses it
MANIFEST = 'manifest.json'
MANIFEST_VERSION = 1


class ExportError(RuntimeError):
    """A graph could not be exported or a manifest does not match the model."""


# ==== the pieces, as modules the exporter can trace ====


class _Unit(nn.Module):

    def __init__(self, model, layer: int, kind: int):
        super().__init__()
        self.blk, self.kind = model.layers[layer], kind
        self.register_buffer('mask', (model.mask if kind == 0 else model.memory_mask).clone())

    def forward(self, x, k=None, v=None):
        if self.kind == 0:
            return self.blk.sa(x, self.mask)
        if self.kind == 1:
            return self.blk.ca(x, (k, v), self.mask)
        return self.blk.ffn(x)


class _Call(nn.Module):
    """Wrap one method of a module (``fn(module, *inputs)``) as a traceable forward."""

    def __init__(self, module: nn.Module, fn):
        super().__init__()
        self.inner, self.fn = module, fn

    def forward(self, *inputs):
        return self.fn(self.inner, *inputs)


def _memory_kv(model, memory):
    out = []
    for blk in model.layers:
        out.extend(blk.multihead_attn.memory_kv(memory))
    return tuple(out)


def _vision(camera: str):
    return lambda encoder, images: encoder.encode_camera(camera, images)


def weights_sha256(policy, pruners: Optional[dict] = None) -> str:
    """Hex SHA-256 of the policy's (and pruners') tensors: what a set of graphs was made from.

    Covers names, shapes, dtypes and values of every parameter and buffer in state-dict order,
    so it changes with any weight, and works for models that never touched a disk.
    """
    digest = hashlib.sha256()
    modules = [('policy', policy)] + [(f'pruner:{s}', p) for s, p in
                                      sorted((pruners or {}).items(), key=lambda i: str(i[0]))]
    for prefix, module in modules:
        for name, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f'{prefix}.{name}:{t.dtype}:{tuple(tensor.shape)}'.encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return digest.hexdigest()


def pruner_graph_name(schedule) -> str:
    """``pruner`` for a pruner usable on any schedule, else ``pruner_<sampler>-<K>``."""
    return 'pruner' if schedule is None else f'pruner_{schedule[0]}-{int(schedule[1])}'


def unit_graph_name(unit: int) -> str:
    """``unit_l<layer>_<sa|ca|ffn>`` of flattened unit b = 3 l + j."""
    return f'unit_l{unit // 3}_{UNIT_KINDS[unit % 3]}'


def _spec(name: str, module: nn.Module, args: tuple, inputs: List[str], outputs: List[str],
          axes: Dict[str, Dict[int, str]], **extra) -> dict:
    return {'name': name, 'module': module, 'args': args, 'inputs': inputs,
            'outputs': outputs, 'axes': axes, **extra}


def _specs(policy, pruners: dict) -> List[dict]:
    """List what to export: name, module, example inputs, input/output names, dynamic axes."""
    model, cfg = policy.transformer, policy.config
    t = cfg.transformer
    B, T_a, T_o, D, A = 1, t.horizon, t.n_obs_steps, t.n_emb, t.action_dim
    nh, dh, T_c, K = t.n_head, D // t.n_head, 1 + T_o, 3
    x = torch.zeros(B, T_a, D)
    batch = {'x': {0: 'B'}, 'd': {0: 'B'}}
    kind_of = type(model)
    specs = []
    for cam in cfg.obs.vision.cameras:
        specs.append(_spec(f'vision_{cam}', _Call(policy.obs_encoder, _vision(cam)),
                           (torch.zeros(2, 3, *cfg.obs.vision.image_size),), ['images'],
                           ['features'], {'images': {0: 'N'}, 'features': {0: 'N'}}))
    specs.append(_spec('obs_tokens', _Call(model, kind_of.encode_obs_tokens),
                       (torch.zeros(B, T_o, cfg.obs.obs_feature_dim),), ['cond'], ['obs_mem'],
                       {'cond': {0: 'B'}, 'obs_mem': {0: 'B'}}))
    specs.append(_spec('time_tokens', _Call(model, kind_of.encode_time_tokens),
                       (torch.arange(K, dtype=torch.long),), ['timesteps'], ['time_mem'],
                       {'timesteps': {0: 'K'}, 'time_mem': {0: 'K'}}))
    kv_names = [f'{kv}_{layer}' for layer in range(t.n_layer) for kv in ('k', 'v')]
    specs.append(_spec('memory_kv', _Call(model, _memory_kv), (torch.zeros(B, T_c, D),),
                       ['memory'], kv_names,
                       {'memory': {0: 'B', 1: 'N'}, **{n: {0: 'B', 2: 'N'} for n in kv_names}}))
    specs.append(_spec('embed', _Call(model, kind_of.embed_sample), (torch.zeros(B, T_a, A),),
                       ['sample'], ['x'], {'sample': {0: 'B'}, 'x': {0: 'B'}}))
    kv = (torch.zeros(B, nh, T_c, dh), torch.zeros(B, nh, T_c, dh))
    for b in range(model.num_units):
        unit = _Unit(model, b // 3, b % 3)
        if b % 3 == 1:
            specs.append(_spec(unit_graph_name(b), unit, (x, *kv), ['x', 'k', 'v'], ['d'],
                               {**batch, 'k': {0: 'B'}, 'v': {0: 'B'}}))
        else:
            specs.append(_spec(unit_graph_name(b), unit, (x,), ['x'], ['d'], batch))
    specs.append(_spec('head', _Call(model, kind_of.output), (x,), ['x'], ['eps'],
                       {'x': {0: 'B'}, 'eps': {0: 'B'}}))
    for schedule, pruner in pruners.items():
        specs.append(_spec(pruner_graph_name(schedule), _Call(pruner, type(pruner).forward),
                           (torch.zeros(K, D), torch.zeros(B, T_o, D)),
                           ['time_mem', 'obs_mem'], ['logits'],
                           {'time_mem': {0: 'K'}, 'obs_mem': {0: 'B'},
                            'logits': {0: 'B', 1: 'K'}}, schedule=schedule))
    return specs


def _io(spec: dict, args, outputs) -> dict:
    def entry(name, tensor):
        dims = spec['axes'].get(name, {})
        return {'name': name, 'dtype': str(tensor.dtype).replace('torch.', ''),
                'shape': [dims.get(i, int(s)) for i, s in enumerate(tensor.shape)]}
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {'inputs': [entry(n, a) for n, a in zip(spec['inputs'], args)],
            'outputs': [entry(n, o) for n, o in zip(spec['outputs'], outs)]}


def export_onnx(policy, pruners: Optional[dict], out_dir: str,
                policy_sha256: Optional[str] = None) -> dict:
    """Write every graph of ``policy`` (and its pruners) and ``manifest.json`` to ``out_dir``.

    The policy must be on the CPU; it is put in eval mode (inference graphs: no dropout).

    Args:
        policy: the :class:`DiffusionPolicy`.
        pruners: ``{(sampler, K) or None: Pruner}`` (see :func:`checkpoint.load_pruners`).
        out_dir: created if missing; existing graphs of the same names are overwritten.
        policy_sha256: the model directory's :func:`checkpoint.policy_sha256`, recorded in
            the manifest when the policy came from one.

    Returns:
        the manifest (also written as ``out_dir/manifest.json``).

    Raises:
        ExportError: the policy is not on the CPU, or torch failed to export a graph.
    """
    if next(policy.parameters()).device.type != 'cpu':
        raise ExportError('export_onnx needs the policy on the CPU (export once, run anywhere)')
    pruners = {s: p.eval() for s, p in (pruners or {}).items()}
    policy.eval()
    os.makedirs(out_dir, exist_ok=True)
    graphs = {}
    for spec in _specs(policy, pruners):
        module = spec['module'].eval()
        path = os.path.join(out_dir, spec['name'] + '.onnx')
        with torch.no_grad():
            outputs = module(*spec['args'])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # the TorchScript exporter's deprecation note
                torch.onnx.export(module, spec['args'], path, dynamo=False, opset_version=OPSET,
                                  input_names=spec['inputs'], output_names=spec['outputs'],
                                  dynamic_axes=spec['axes'], do_constant_folding=True)
        except Exception as exc:  # noqa: B902 - re-raised with the graph's name
            raise ExportError(f'exporting graph {spec["name"]!r} failed: {exc}') from exc
        entry = {'file': spec['name'] + '.onnx', **_io(spec, spec['args'], outputs)}
        if 'schedule' in spec:
            s = spec['schedule']
            entry['schedule'] = None if s is None else [s[0], int(s[1])]
        graphs[spec['name']] = entry
    t = policy.config.transformer
    manifest = {
        'format': 'onnx', 'manifest_version': MANIFEST_VERSION, 'opset': OPSET,
        'layout': 'unit', 'torch': torch.__version__,
        'policy_sha256': policy_sha256, 'weights_sha256': weights_sha256(policy, pruners),
        'model': {'n_layer': t.n_layer, 'n_head': t.n_head, 'n_emb': t.n_emb,
                  'horizon': t.horizon, 'n_obs_steps': t.n_obs_steps,
                  'action_dim': t.action_dim, 'obs_feature_dim': policy.config.obs
                  .obs_feature_dim, 'cameras': list(policy.config.obs.vision.cameras),
                  'image_size': list(policy.config.obs.vision.image_size)},
        'graphs': graphs,
    }
    with open(os.path.join(out_dir, MANIFEST), 'w') as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_manifest(directory: str) -> dict:
    """Read ``directory/manifest.json``; ExportError names what is missing or unreadable."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ExportError(f'no readable ONNX manifest at {path}: {exc}') from exc
    if manifest.get('manifest_version') != MANIFEST_VERSION:
        raise ExportError(f'{path}: manifest_version {manifest.get("manifest_version")!r}, '
                          f'expected {MANIFEST_VERSION}')
    missing = [g['file'] for g in manifest.get('graphs', {}).values()
               if not os.path.isfile(os.path.join(directory, g['file']))]
    if missing:
        raise ExportError(f'{directory}: graphs listed in the manifest are missing: {missing}')
    return manifest


def check_manifest(manifest: dict, policy, pruners: Optional[dict]) -> Dict[str, dict]:
    """Raise ExportError unless the manifest's graphs were made from these weights."""
    want = weights_sha256(policy, pruners)
    if manifest.get('weights_sha256') != want:
        raise ExportError(f'the graphs were exported from other weights '
                          f'(weights_sha256 {manifest.get("weights_sha256")!r}, model {want!r})')
    return manifest['graphs']
