r"""Whole-chunk sparse graph: every (step, unit) a conditional on the device gate map.

One batch-1 sparse chunk as a single program with no host decision inside it (issue 24)::

    obs_mem --> memory K/V --> step 0 dense (every unit computes, fills its store slot)
           \--> gate_fn (the pruner, on a side stream during step 0) --> gates (K, U)
    gates + rollout state --> chunk_plan --> compute (K, U) bool, source (K, U) long
    steps 1..K-1, unit b:  d = cond(compute[k, b], f_b(x) -> store[k U + b],  store[source])
                           x = x + d

The reuse rules are :func:`cache.chunk_plan`'s (the one home of the rules; its test checks it
against the per-unit form the eager loop uses). The caches are one store of K * U rollout
slots (1, T_a, D) plus a filled map and the chunk that wrote each slot, all device tensors;
the forward and timestep caches are pointers into the store (see :func:`cache.chunk_plan`).

``cond`` is ``torch.ops.higher_order.cond``, the operator behind ``torch.cond``, called
directly: ``torch.cond`` would trace every branch with dynamo first (a (step, unit) closure
each, K * U traces a chunk), while the operator runs the Python branches as they are. Eagerly
(the CPU) it is a Python ``if`` on the predicate; under CUDA stream capture with torch's
``CUDAGraphCaptureControlFlowOpDispatchMode`` each call becomes conditional IF nodes (CUDA >=
12.4; torch's ``cudagraph_conditional_nodes``), so one captured graph per (schedule, gate
source, batch size) replays any gate map. Where that is missing, or the capture fails, the
engine falls back to the step graphs (:mod:`cuda_graphs`) and logs why once.

Tested on the CPU (eager): chunks equal the eager sparse loop to 1e-5 over several chunks,
DDIM and DDPM, learned gates and the dial, with rollout aging (``test_core_chunk_graph.py``).
The CUDA capture is UNTESTED ON A GPU: no GPU was lent while this was written; run
``scripts/gpu_check.sh`` (docs/gpu.md) before relying on it.
"""

import logging
from typing import Callable
from typing import Optional
from typing import Tuple

from sparse_policy_node.core.cache import advance_rollout
from sparse_policy_node.core.cache import chunk_plan
from sparse_policy_node.core.cache import FeatureCache
from sparse_policy_node.core.sampler import compute_unit
from sparse_policy_node.core.scheduler import NoiseScheduler
from sparse_policy_node.core.transformer import DPTransformer
import torch

LOG = logging.getLogger(__name__)
cond = torch.ops.higher_order.cond


def conditional_nodes(device: torch.device) -> Tuple[bool, str]:
    """Whether this torch and CUDA can capture ``cond`` into conditional graph nodes.

    Returns:
        (available, reason): the reason names what is missing when not available.
    """
    if device.type != 'cuda':
        return False, f'{device.type} is not a CUDA device'
    try:
        from torch._higher_order_ops import cudagraph_conditional_nodes  # noqa: F401
    except ImportError as exc:
        return False, f'torch {torch.__version__} cannot capture torch.cond ({exc})'
    if not hasattr(torch.cuda.CUDAGraph, 'begin_capture_to_if_node'):
        return False, f'torch {torch.__version__} has no CUDAGraph.begin_capture_to_if_node'
    version = tuple(int(v) for v in (torch.version.cuda or '0.0').split('.')[:2])
    if version < (12, 4):
        return False, f'CUDA {torch.version.cuda} < 12.4 has no conditional graph nodes'
    return True, ''


class SparseChunkGraph:
    """One batch-1 sparse chunk on device state: captured once (CUDA), or run eagerly (CPU)."""

    def __init__(self, model: DPTransformer, scheduler: NoiseScheduler, time_kv: list,
                 obs_mem: torch.Tensor, noise: torch.Tensor, step_noise: Optional[torch.Tensor],
                 gate_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 capture: Optional[bool] = None):
        """Allocate the static inputs, the store and the rollout state; capture on CUDA.

        Args:
            model: the transformer (eval mode).
            scheduler: its inference timesteps set; the coefficients are baked in.
            time_kv: per layer (k, v) of the schedule's time tokens (constant per schedule).
            obs_mem: (1, T_o, D) float32 memory observation tokens of an example chunk.
            noise: (1, T_a, A) example initial noise.
            step_noise: (K, 1, T_a, A) example DDPM variance noise, or None for DDIM.
            gate_fn: (1, T_o, D) obs_mem -> (K, U) long gates on the device, run inside the
                chunk (captured with it; a side stream during step 0 on CUDA); None: the
                gates are an input of :meth:`run`.
            capture: capture a CUDA graph (default: on a CUDA device); False runs eagerly.

        Raises:
            RuntimeError: the capture failed (the engine falls back to the step graphs).
        """
        self.model, self.scheduler, self.time_kv = model, scheduler, time_kv
        self.gate_fn = gate_fn
        K, U = scheduler.num_steps, model.num_units
        self.num_steps, self.num_units = K, U
        device = noise.device
        self.obs_mem = obs_mem.clone()  # static inputs
        self.noise = noise.clone()
        self.step_noise = None if step_noise is None else step_noise.clone()
        self.gates = torch.zeros(K, U, dtype=torch.long, device=device)
        self.dense = torch.zeros((), dtype=torch.bool, device=device)
        self.chunk = torch.zeros((), dtype=torch.long, device=device)
        self.max_age = torch.zeros((), dtype=torch.long, device=device)
        # the caches: slot n = k U + b holds the last output computed at (k, b)
        self.store = torch.zeros(K * U, *noise.shape[:2], model.n_emb,
                                 dtype=model.pos_emb.dtype, device=device)
        self.filled = torch.zeros(K, U, dtype=torch.bool, device=device)
        self.written = torch.zeros(K, U, dtype=torch.long, device=device)
        self.graph = None
        self.side = torch.cuda.Stream(device) if device.type == 'cuda' else None
        if capture is None:
            capture = device.type == 'cuda'
        if capture:
            self._capture(device)

    def _capture(self, device: torch.device) -> None:
        # Warm up on a side stream first (cuBLAS handles and workspaces, the gate tables):
        # one dense chunk runs every kernel of the compute branches, one reuse runs the other
        # branch's. Then capture, with cond calls turned into conditional IF nodes by torch's
        # dispatch mode. UNTESTED ON A GPU (see the module docstring).
        from torch._higher_order_ops.cudagraph_conditional_nodes import (
            CUDAGraphCaptureControlFlowOpDispatchMode)
        state = (self.store.clone(), self.filled.clone(), self.written.clone())
        main = torch.cuda.current_stream(device)
        warm = torch.cuda.Stream(device)
        warm.wait_stream(main)
        with torch.cuda.stream(warm):
            self.dense.fill_(True)
            self._chunk()
            _reuse_branch(None, self.store, self.gates[0, :1])
            self.dense.fill_(False)
        main.wait_stream(warm)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode='thread_local'), \
                CUDAGraphCaptureControlFlowOpDispatchMode():
            self.out = self._chunk()  # static outputs
        # the warm-up wrote the store and the rollout state: put them back
        self.store.copy_(state[0])
        self.filled.copy_(state[1])
        self.written.copy_(state[2])

    @torch.no_grad()
    def _chunk(self) -> Tuple[torch.Tensor, dict]:
        """Run the chunk body: (1, T_a, A) denoised actions and the :func:`chunk_plan` it ran."""
        model, sched, store = self.model, self.scheduler, self.store
        kv = model.assemble_kv(self.time_kv, model.obs_kv(self.obs_mem.to(store.dtype)))
        gates, main, side = self.gates, None, self.side
        if self.gate_fn is not None:
            if side is not None:  # the pruner overlaps step 0 (a fork in the graph)
                main = torch.cuda.current_stream(self.obs_mem.device)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    gates = self.gate_fn(self.obs_mem)
            else:
                gates = self.gate_fn(self.obs_mem)
        x_a = self.noise
        for k in range(self.num_steps):
            if k == 1:
                if main is not None:
                    main.wait_stream(side)
                plan = chunk_plan(torch.where(self.dense, 0, gates), self.filled,
                                  self.written, self.chunk, self.max_age)
            x = model.embed_sample(x_a.to(store.dtype))  # (1, T_a, D)
            for b in range(self.num_units):
                if k == 0:  # step 0 computes every unit
                    d = compute_unit(model, b, x, kv, 0)
                    store[b].copy_(d)
                else:
                    d = cond(plan['compute'][k, b], self._compute_branch(k, b, kv),
                             _reuse_branch, (x, store, plan['source'][k, b:b + 1]))
                x += d
            eps = model.output(x).to(x_a.dtype)
            x_a = sched.step(eps, k, x_a, None if self.step_noise is None else self.step_noise[k])
        if self.num_steps == 1:
            plan = chunk_plan(torch.zeros_like(gates), self.filled, self.written, self.chunk,
                              self.max_age)
        advance_rollout(plan, self.filled, self.written, self.chunk)
        return x_a, plan

    def _compute_branch(self, k: int, b: int, kv: list) -> Callable:
        n = k * self.num_units + b

        def compute(x, store, source):
            d = compute_unit(self.model, b, x, kv, k)  # (1, T_a, D)
            store[n].copy_(d)
            return d
        return compute

    def run(self, obs_mem: torch.Tensor, noise: torch.Tensor,
            step_noise: Optional[torch.Tensor], cache: FeatureCache, dense: bool,
            gates: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, dict]:
        """One chunk: replay the graph (CUDA) or run the body (CPU).

        Args:
            obs_mem: (1, T_o, D) float32 memory observation tokens.
            noise: (1, T_a, A) initial noise; step_noise: (K, 1, T_a, A) or None (DDIM).
            cache: the engine's cache, begun for this chunk: its chunk number and max age
                (its slots stay empty: the store here holds the values).
            dense: the chunk must compute every unit (first chunk since a reset).
            gates: (K, U) long gate map when the graph has no ``gate_fn``.

        Returns:
            (1, T_a, A) denoised normalized actions and the chunk's :func:`chunk_plan`
            (``executed`` choices, rollout ``age`` and ``expired``; fresh device tensors, not
            read here: nothing in a chunk waits on the host).
        """
        self.obs_mem.copy_(obs_mem)
        self.noise.copy_(noise)
        if self.step_noise is not None:
            self.step_noise.copy_(step_noise)
        if gates is not None:
            self.gates.copy_(gates, non_blocking=True)
        self.dense.fill_(bool(dense))  # host scalars: kernel arguments, no transfer
        self.chunk.fill_(cache.chunk)
        self.max_age.fill_(cache.max_age)
        if self.graph is not None:
            self.graph.replay()
            x_a, plan = self.out
        else:
            x_a, plan = self._chunk()
        return x_a.clone(), {key: value.clone() for key, value in plan.items()}


def _reuse_branch(x: torch.Tensor, store: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    # The cached (1, T_a, D) value at store slot source (a (1,) device index).
    return store.index_select(0, source)[0]
