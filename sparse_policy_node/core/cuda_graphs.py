"""CUDA graphs of batch-1 chunks (``RuntimeConfig.cuda_graphs``).

At batch 1 the decoder is launch-bound: a DDPM-100 chunk of the paper's DP-T issues about
15 000 small kernels from Python, and a sparse chunk still issues one add per reused unit.
Two graph forms remove that launch cost:

* :class:`DenseChunkGraph` (dense runtimes: sparsity off or ``gate_source='dense'``): the
  whole chunk, captured once per (schedule, dtype) and replayed as one graph. The cache slots
  after a replay are references into the graph's memory pool, which the next replay rewrites;
  the next replay is always a dense chunk that rewrites every slot, so no slot changes value
  under a reader.
* :class:`StepGraphs` (sparse runtimes, the dense first chunk included): one graph per
  (step k, executed choices of that step's U units), captured the second time the pattern is
  seen and replayed after that (the first time runs eagerly on the same buffers). Learned gates
  repeat their step patterns: on the shipped Lift model 84% of the steps of the first 20-40
  chunks already had a pattern seen before (DDIM-10 learned, DDPM-100 at the dial 0.93). The
  caches become static buffers (forward 3, timestep U, rollout K x U slots of (1, T_a, D)):
  computing a unit copies its output into its three slots inside the graph; the host keeps
  the bookkeeping (which slots are filled, the chunk that wrote each rollout slot) in the
  engine's :class:`FeatureCache`, whose slots point at the buffers, so fallbacks (empty slot,
  expired rollout slot) are decided on the host before the step, exactly as the eager loop
  decides them.

Both give the eager loop's values (same kernels; copies are exact). The loop issues no host
synchronisation: gates are read once before step 1, as in the eager loop.
"""

from typing import Callable
from typing import List
from typing import Optional

from sparse_policy_node.core.cache import COMPUTE
from sparse_policy_node.core.cache import FeatureCache
from sparse_policy_node.core.cache import RolloutAgeStats
from sparse_policy_node.core.sampler import compute_unit
from sparse_policy_node.core.scheduler import NoiseScheduler
from sparse_policy_node.core.sparse_sampler import sample_sparse
from sparse_policy_node.core.transformer import DPTransformer
import torch


class DenseChunkGraph:
    """One captured dense chunk for a fixed model, schedule and batch of 1."""

    def __init__(self, model: DPTransformer, scheduler: NoiseScheduler, time_kv: list,
                 obs_mem: torch.Tensor, noise: torch.Tensor,
                 step_noise: Optional[torch.Tensor]):
        """Capture the chunk (warm-up on a side stream first, as CUDA graphs require).

        Args:
            model: the transformer (eval mode, on a CUDA device).
            scheduler: its inference timesteps set; the coefficients are baked in.
            time_kv: per layer (k, v) of the schedule's time tokens (constant per schedule).
            obs_mem: (1, T_o, D) memory observation tokens of an example chunk.
            noise: (1, T_a, A) example initial noise.
            step_noise: (K, 1, T_a, A) example DDPM variance noise, or None for DDIM.
        """
        self.model, self.scheduler, self.time_kv = model, scheduler, time_kv
        self.num_steps = scheduler.num_steps
        self.obs_mem = obs_mem.clone()  # static inputs
        self.noise = noise.clone()
        self.step_noise = None if step_noise is None else step_noise.clone()
        self.cache = FeatureCache(model.num_units)
        _warm_up(self._chunk, obs_mem.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode='thread_local'):
            self.out = self._chunk()  # (1, T_a, A) static output

    @torch.no_grad()
    def _chunk(self) -> torch.Tensor:
        model = self.model
        kv_all = model.assemble_kv(self.time_kv, model.obs_kv(self.obs_mem))
        self.cache.reset()
        self.cache.begin_chunk(('graph',), self.num_steps)
        x, _ = sample_sparse(model, self.scheduler, kv_all, self.noise, None, self.cache,
                             self.step_noise)
        return x

    def replay(self, obs_mem: torch.Tensor, noise: torch.Tensor,
               step_noise: Optional[torch.Tensor], cache: FeatureCache) -> torch.Tensor:
        """Run one dense chunk; fill ``cache`` (begun for this chunk) as the eager loop would.

        Returns:
            (1, T_a, A) denoised normalized actions (a fresh tensor, not the static output).
        """
        self.obs_mem.copy_(obs_mem)
        self.noise.copy_(noise)
        if self.step_noise is not None:
            self.step_noise.copy_(step_noise)
        self.graph.replay()
        cache.take_chunk(self.cache)
        return self.out.clone()


def _warm_up(fn: Callable, device) -> None:
    # Run once on a side stream before the first capture: cuBLAS handles and workspaces must be
    # created outside capture (the pattern of torch.cuda.graphs' documentation).
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)


class StepGraphs:
    """Per-(step, pattern) graphs of the batch-1 sparse loop, on static cache buffers."""

    def __init__(self, model: DPTransformer, scheduler: NoiseScheduler, kv_all: list,
                 noise: torch.Tensor, step_noise: Optional[torch.Tensor],
                 max_graphs: int = 4096):
        """Allocate the static buffers for one schedule (shapes from example inputs).

        Args:
            model: the transformer (eval mode, on a CUDA device).
            scheduler: its inference timesteps set; each step's coefficients are baked in.
            kv_all: example per layer (k, v), each (1, K, nh, T_c, dh).
            noise: (1, T_a, A) example initial noise.
            step_noise: (K, 1, T_a, A) example DDPM variance noise, or None for DDIM.
            max_graphs: captured graphs kept; beyond it, new patterns run eagerly.
        """
        self.model, self.scheduler = model, scheduler
        K, U = scheduler.num_steps, model.num_units
        self.num_steps, self.num_units = K, U
        self.kv = [tuple(t.clone() for t in pair) for pair in kv_all]
        self.x_a = noise.clone()  # (1, T_a, A) the sample, updated in place step by step
        self.noise = None if step_noise is None else step_noise.clone()
        T_a, D = noise.shape[1], model.n_emb
        dtype, device = model.pos_emb.dtype, noise.device

        def slot():
            return torch.zeros(1, T_a, D, dtype=dtype, device=device)

        # The static slots (forward 3, timestep U, rollout K x U), laid out and written by the
        # rules of FeatureCache: every slot filled, never expiring.
        self.buffers = FeatureCache(U)
        self.buffers.begin_chunk(('buffers',), K)
        self.buffers.forward = [slot() for _ in range(3)]
        self.buffers.timestep = [slot() for _ in range(U)]
        self.buffers.rollout = [[slot() for _ in range(U)] for _ in range(K)]
        self.graphs = {}
        self.seen = set()
        self.max_graphs = max_graphs
        self.captures = 0
        # On the CPU nothing is captured: every step runs eagerly on the same buffers (tests
        # check the buffer logic there).
        self.capturing = device.type == 'cuda'
        if self.capturing:
            self.pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time
            self.capture_stream = torch.cuda.Stream(device)
            _warm_up(lambda: self._step(0, (COMPUTE,) * U), device)

    def _step(self, k: int, row) -> None:
        """Denoising step k with the executed choices ``row`` (graph body, or eager)."""
        model = self.model
        x = model.embed_sample(self.x_a.to(model.pos_emb.dtype))  # (1, T_a, D)
        for b, choice in enumerate(row):
            d = self.buffers.source(choice, k, b)  # None: compute (row holds no fallbacks)
            if d is None:
                d = compute_unit(model, b, x, self.kv, k)
                self.buffers.copy_in(k, b, d)
            x += d
        eps = model.output(x).to(self.x_a.dtype)
        self.x_a.copy_(self.scheduler.step(eps, k, self.x_a,
                                           None if self.noise is None else self.noise[k]))

    def _executed(self, k: int, gates: Optional[List[int]], cache: FeatureCache,
                  ages: Optional[RolloutAgeStats]) -> tuple:
        """Choices actually executed at step k (fallbacks as in :func:`sparse_step`).

        Marks the slots a computing unit fills in ``cache`` (pointing them at the buffers).
        """
        row = []
        for b in range(self.num_units):
            choice = COMPUTE if gates is None else gates[b]
            if cache.source(choice, k, b, ages) is None:
                choice = COMPUTE
                cache.store_from(self.buffers, k, b)
            row.append(choice)
        return tuple(row)

    def _run_step(self, k: int, row: tuple) -> None:
        key = (k, row)
        graph = self.graphs.get(key)
        if (graph is None and key in self.seen and self.capturing
                and len(self.graphs) < self.max_graphs):
            # Captured on a side stream without torch.cuda.graph's synchronize / gc.collect /
            # empty_cache (tens of ms): a capture then costs about one eager step.
            graph = torch.cuda.CUDAGraph()
            main = torch.cuda.current_stream(self.x_a.device)
            self.capture_stream.wait_stream(main)
            with torch.cuda.stream(self.capture_stream):
                graph.capture_begin(pool=self.pool, capture_error_mode='thread_local')
                try:
                    self._step(k, row)
                finally:
                    graph.capture_end()
            main.wait_stream(self.capture_stream)
            self.graphs[key] = graph
            self.captures += 1
        if graph is None:
            self.seen.add(key)
            self._step(k, row)  # first sight: eager, on the same buffers
        else:
            graph.replay()

    @torch.no_grad()
    def run(self, kv_all: list, noise: torch.Tensor, step_noise: Optional[torch.Tensor],
            gates_fn: Optional[Callable[[], list]], cache: FeatureCache,
            ages: Optional[RolloutAgeStats] = None):
        """One batch-1 chunk, like :func:`sample_sparse` (same arguments and results).

        ``cache`` must have been begun for this chunk and be used by this object only (its
        filled slots point at the buffers here).

        Returns:
            x: (1, T_a, A) denoised normalized actions (a fresh tensor).
            executed: K rows of U executed choices.
        """
        for dst, src in zip(self.kv, kv_all):
            dst[0].copy_(src[0])
            dst[1].copy_(src[1])
        self.x_a.copy_(noise)
        if self.noise is not None:
            self.noise.copy_(step_noise)
        executed, gates = [], None
        for k in range(self.num_steps):
            if k == 1 and gates_fn is not None:
                gates = gates_fn()  # the one wait, before step 1
            row = self._executed(k, None if k == 0 or gates is None else gates[k], cache, ages)
            self._run_step(k, row)
            executed.append(list(row))
        return self.x_a.clone(), executed
