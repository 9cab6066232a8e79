"""CUDA graph of a whole dense batch-1 chunk (``RuntimeConfig.cuda_graphs``).

At batch 1 the decoder is launch-bound: a DDPM-100 chunk of the paper's DP-T issues about
15 000 small kernels from Python. A dense chunk runs the same kernels every time, so it is
captured once per (schedule, dtype) and replayed as one graph: the observation's memory
tokens, the initial noise and the DDPM variance noise are copied into static buffers, the
graph recomputes the cross-attention keys/values and runs all K steps, and the caches are
handed the branch outputs.

What is graphed, and why only that: dense chunks (sparsity off, ``gate_source='dense'``, and
the first chunk after every reset). A sparse chunk's work depends on its gate map, which
learned gates change every chunk, and its reuses read cache slots by reference; a graph per
gate pattern would be captured far more often than replayed. Sparse chunks stay eager.

Cache semantics are unchanged: the cache slots after a replay are references into the graph's
memory pool, which the next replay rewrites. The next replay is always a dense chunk, which
rewrites every slot anyway, so no slot ever changes value under a reader.
"""

from typing import Optional

from sparse_policy_node.core.cache import FeatureCache
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
        side = torch.cuda.Stream(obs_mem.device)
        side.wait_stream(torch.cuda.current_stream(obs_mem.device))
        with torch.cuda.stream(side):
            self._chunk()  # warm-up: cuBLAS handles and workspaces are created outside capture
        torch.cuda.current_stream(obs_mem.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
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
        src = self.cache
        cache.forward = list(src.forward)
        cache.timestep = list(src.timestep)
        for k in range(self.num_steps):
            cache.rollout[k] = list(src.rollout[k])
            cache.written[k] = [cache.chunk] * cache.num_units
        return self.out.clone()
