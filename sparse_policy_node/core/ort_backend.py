"""ONNX Runtime backend: drop-ins for the model pieces the sparse loop calls.

:class:`GraphTransformer` has the per-unit API of :class:`DPTransformer` that the engine and
:mod:`sparse_sampler` use (``layers[l].sa/ca/ffn``, ``embed_sample``, ``output``, the memory
encoders), each method one call of an exported graph (:mod:`onnx_export`), so the Python loop
that skips and reuses units is the same code for every backend. The runner of a graph is
injected: :class:`OrtGraph` here, TensorRT engines in :mod:`tensorrt_backend`.

Tensors cross as CPU float32: inputs are handed to ONNX Runtime as numpy views (no copy for
contiguous tensors) and outputs come back as tensors sharing ONNX Runtime's output buffers.
"""

import os
from typing import Callable
from typing import Dict
from typing import List
from typing import Optional
from typing import Tuple

from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.onnx_export import pruner_graph_name
from sparse_policy_node.core.onnx_export import unit_graph_name
from sparse_policy_node.core.transformer import DPTransformer
from sparse_policy_node.core.transformer import UNIT_KINDS
import torch

# A graph runner: called with the graph's inputs in manifest order, returns its outputs.
Runner = Callable[..., List[torch.Tensor]]


def import_onnxruntime():
    """Return the ``onnxruntime`` module, or raise ConfigError saying how to get it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f'backend onnxruntime needs the onnxruntime package, which is not '
                          f'importable here ({exc}); pip install onnxruntime (see '
                          f'requirements/runtime.txt), or use backend torch') from exc
    return onnxruntime


class OrtGraph:
    """One ONNX Runtime session on the CPU, called with and returning torch tensors."""

    def __init__(self, path: str, threads: int):
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Dozens of small sessions share the cores with torch: idle pool threads must sleep.
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        self.session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.name = os.path.splitext(os.path.basename(path))[0]
        # A unit is tens of microseconds of work at batch 1, so the call overhead counts:
        # the binding under InferenceSession.run skips its per-call feed validation (the
        # feed is always these names) and halves the wrapper's cost here.
        inner = getattr(self.session, '_sess', None)
        self._run = inner.run if hasattr(inner, 'run') else self.session.run

    def __call__(self, *inputs: torch.Tensor) -> List[torch.Tensor]:
        """Run the graph on CPU float32 (or int64) tensors; return its outputs as tensors."""
        feed = dict(zip(self.input_names, [t.detach().numpy() for t in inputs]))
        return [torch.from_numpy(o) for o in self._run(self.output_names, feed, None)]


class GraphLayer:
    """One decoder layer's branches with :class:`DecoderLayer`'s signatures (masks are baked)."""

    def __init__(self, sa: Runner, ca: Runner, ffn: Runner):
        self._sa, self._ca, self._ffn = sa, ca, ffn

    def sa(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Self-attention branch: (B, T_a, D) -> (B, T_a, D)."""
        return self._sa(x)[0]

    def ca(self, x: torch.Tensor, kv: Tuple[torch.Tensor, torch.Tensor],
           mask=None) -> torch.Tensor:
        """Cross-attention branch on this step's memory heads, each (B, nh, T_c, dh)."""
        return self._ca(x, kv[0], kv[1])[0]

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """Feed-forward branch: (B, T_a, D) -> (B, T_a, D)."""
        return self._ffn(x)[0]


class GraphTransformer:
    """The inference API of :class:`DPTransformer`, each piece one exported graph."""

    # Pure tensor plumbing, identical for every backend.
    assemble_kv = staticmethod(DPTransformer.assemble_kv)
    assemble_memory = staticmethod(DPTransformer.assemble_memory)

    def __init__(self, model: DPTransformer, graphs: Dict[str, Runner]):
        """Wrap ``graphs`` (name -> runner, names of :func:`onnx_export._specs`)."""
        self.config = model.config
        self.n_emb = model.n_emb
        self.training = False
        self.mask = self.memory_mask = None  # baked into the unit graphs
        # The loops read the activation dtype from ``pos_emb``; graphs take float32.
        self.pos_emb = torch.zeros(0)
        L = len(model.layers)
        self.layers = [GraphLayer(*(graphs[unit_graph_name(3 * layer + j)] for j in range(3)))
                       for layer in range(L)]
        self._embed, self._head = graphs['embed'], graphs['head']
        self._obs, self._time, self._kv = (graphs['obs_tokens'], graphs['time_tokens'],
                                           graphs['memory_kv'])

    @property
    def num_units(self) -> int:
        """U = 3 * n_layer."""
        return 3 * len(self.layers)

    def embed_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """(B, T_a, A) noisy actions -> (B, T_a, D) residual stream input."""
        return self._embed(sample)[0]

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T_a, D) final residual -> (B, T_a, A) predicted noise."""
        return self._head(x)[0]

    def encode_time_tokens(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(K,) timesteps -> (K, D) memory time tokens."""
        return self._time(timesteps.long())[0]

    def encode_obs_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, T_o, D_o) observation features -> (B, T_o, D) memory observation tokens."""
        return self._obs(cond)[0]

    def encode_condition_parts(self, timesteps: torch.Tensor, cond: torch.Tensor):
        """(K, D) time tokens and (B, T_o, D) observation tokens (see DPTransformer)."""
        return self.encode_time_tokens(timesteps), self.encode_obs_tokens(cond)

    def _memory_kv(self, memory: torch.Tensor) -> list:
        out = self._kv(memory)
        return [(out[2 * i], out[2 * i + 1]) for i in range(len(self.layers))]

    def time_kv(self, time_mem: torch.Tensor) -> list:
        """Per layer (k, v) of the (K, D) time tokens, each (1, nh, K, dh)."""
        return self._memory_kv(time_mem[None])

    def obs_kv(self, obs_mem: torch.Tensor) -> list:
        """Per layer (k, v) of (B, T_o, D) observation tokens, each (B, nh, T_o, dh)."""
        return self._memory_kv(obs_mem)

    def memory_kv_all_steps(self, time_mem: torch.Tensor, obs_mem: torch.Tensor) -> list:
        """Per layer (k, v), each (B, K, nh, T_c, dh) (see DPTransformer)."""
        return self.assemble_kv(self.time_kv(time_mem), self.obs_kv(obs_mem))

    def unit(self, layer: int, kind: int, x: torch.Tensor, memory: torch.Tensor = None,
             kv: Tuple[torch.Tensor, torch.Tensor] = None) -> torch.Tensor:
        """Return the branch output of layer ``layer``'s unit ``kind``, as DPTransformer does."""
        blk = self.layers[layer]
        if kind == 0:
            return blk.sa(x)
        if kind == 1:
            return blk.ca(x, kv if kv is not None else self._memory_kv(memory)[layer])
        if kind == 2:
            return blk.ffn(x)
        raise ValueError(f'unit kind must be 0 (SA), 1 (CA) or 2 (FFN), got {kind!r}')

    def unit_index_names(self) -> List[str]:
        """Names ``'l{layer}.{sa|ca|ffn}'`` of the U units in flattened order."""
        return [f'l{b // 3}.{UNIT_KINDS[b % 3]}' for b in range(self.num_units)]


class GraphPruner:
    """A pruner graph with :class:`Pruner`'s call signature and attributes."""

    def __init__(self, pruner, runner: Runner):
        self.config, self.schedule = pruner.config, pruner.schedule
        self.metadata, self.num_units = pruner.metadata, pruner.num_units
        self.training = False
        self._run = runner

    def __call__(self, time_mem: torch.Tensor, obs_mem: torch.Tensor) -> torch.Tensor:
        """Map (K, D) time tokens and (B, T_o, D) observation tokens to (B, K, U, 4) logits."""
        return self._run(time_mem, obs_mem)[0]


class GraphCameras:
    """Per-camera vision graphs behind :meth:`ObsEncoder.encode_camera`'s signature."""

    def __init__(self, graphs: Dict[str, Runner]):
        self._graphs = graphs

    def encode_camera(self, camera: str, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 (or float in [0, 255]) frames -> (N, F) features."""
        return self._graphs[f'vision_{camera}'](images.float().contiguous())[0]


def graph_pieces(policy, pruners: Optional[dict], graphs: Dict[str, Runner]):
    """Return (transformer, cameras, pruners) drop-ins over ``graphs`` (name -> runner)."""
    pruners = pruners or {}
    missing = [pruner_graph_name(s) for s in pruners if pruner_graph_name(s) not in graphs]
    if missing:
        raise ConfigError(f'the exported graphs lack {missing}; export again')
    return (GraphTransformer(policy.transformer, graphs), GraphCameras(graphs),
            {s: GraphPruner(p, graphs[pruner_graph_name(s)]) for s, p in pruners.items()})


def load_ort_graphs(directory: str, manifest: dict, threads: int) -> Dict[str, Runner]:
    """Open one :class:`OrtGraph` per graph of the manifest in ``directory``."""
    return {name: OrtGraph(os.path.join(directory, g['file']), threads)
            for name, g in manifest['graphs'].items()}
