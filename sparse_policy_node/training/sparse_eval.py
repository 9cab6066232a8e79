"""The sparse engine as an evaluation variant, and its statistics and trade-off plot.

:class:`SparseVariant` runs :class:`SparseEngine` at batch 1, so units are truly skipped and
the measured chunk latency is the deployed one. Which runtime each variant name gets is
decided in :mod:`variants`, the one place variants are built.
"""

from typing import Dict
from typing import List
from typing import Optional

import numpy as np
from sparse_policy_node.core.config import RuntimeConfig
import torch


class SparseVariant:
    """Policy-like wrapper of :class:`SparseEngine` that keeps per-chunk statistics."""

    def __init__(self, policy, pruner, runtime: Optional[RuntimeConfig]):
        from sparse_policy_node.core.engine import SparseEngine
        self.engine = SparseEngine(policy, pruner, runtime)
        self.chunks: List[dict] = []

    def reset(self) -> None:
        """Start a new episode: clear the engine's caches (next chunk dense) and the statistics."""
        self.engine.reset()
        self.chunks = []

    def predict_action(self, obs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One chunk; noise comes from torch's global generator (seeded per episode)."""
        out = self.engine.predict_action(obs)
        self.chunks.append(out['stats'])
        return out

    def episode_stats(self) -> dict:
        """Per-episode means: sparsity of the gated chunks and of all chunks, MACs, times."""
        return chunk_summary(self.chunks)

    def close(self) -> None:
        """Stop the engine's worker thread."""
        self.engine.close()


def chunk_summary(chunks: List[dict]) -> dict:
    """Summarize the engine statistics of one episode's chunks.

    ``realized_sparsity`` averages the chunks the gates control (the first chunk of an episode
    is dense by rule); ``episode_sparsity`` averages every chunk, the first one included.
    """
    if not chunks:
        return {}
    gated = [c for c in chunks if not c['dense']] or chunks
    return {
        'realized_sparsity': round(float(np.mean([c['realized_sparsity'] for c in gated])), 4),
        'episode_sparsity': round(float(np.mean([c['realized_sparsity'] for c in chunks])), 4),
        'gmacs': round(float(np.mean([c['gmacs'] for c in chunks])), 4),
        'pruner_ms': round(float(np.mean([c['pruner_ms'] for c in gated])), 3),
        'reuse_counts': {k: int(sum(c[k] for c in gated))
                         for k in ('compute', 'forward', 'timestep', 'rollout')},
    }


def plot_tradeoff(report: dict, variants: List[str], path: str) -> None:
    """Save success rate against realized sparsity and against chunk latency, per variant."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    K_ref = report.get('num_inference_steps') or 100
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for name in variants:
        success = report[f'success_{name}']
        latency = report[f'chunk_ms_{name}']
        if name.startswith('ddim-'):
            # Fewer steps skip whole steps: plotted at the share of step evaluations skipped.
            x, marker = 1.0 - int(name.split('-')[1]) / K_ref, 's'
        else:
            x, marker = report.get(f'realized_sparsity_{name}', 0.0), 'o'
        for ax, xv in ((ax_s, x), (ax_t, latency)):
            ax.scatter([xv], [success], marker=marker)
            ax.annotate(name, (xv, success), fontsize=7, xytext=(3, 3),
                        textcoords='offset points')
    ax_s.set_xlabel('realized sparsity (gated chunks; DDIM: 1 - K / K_dense)')
    ax_t.set_xlabel('mean chunk latency (ms, batch 1)')
    for ax in (ax_s, ax_t):
        ax.set_ylabel('success rate')
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle(f'{report["task"]}: {report["episodes"]} episodes from seed '
                 f'{report["seed_start"]}')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
