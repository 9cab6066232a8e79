"""Analytic multiply-accumulate counts per chunk (the way the paper's "GFLOPs" count).

The paper's dense 7.88 "GFLOPs" for the image DP-T is a MAC count of the transformer over
K = 100 steps (tts_method.md §2.3); we count the same way, and report the pruner separately.
The observation (vision) encoder runs once per chunk for dense and sparse alike and is
excluded, as in the paper.
"""

from typing import Optional

from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.config import TransformerConfig


def unit_macs(cfg: TransformerConfig) -> tuple:
    """Count the MACs of one (SA, CA, FFN) unit evaluation at batch 1, LayerNorms ignored."""
    D, T, S = cfg.n_emb, cfg.horizon, 1 + cfg.n_obs_steps
    sa = 4 * T * D * D + 2 * T * T * D
    ca = 2 * T * D * D + 2 * T * S * D  # q/out projections + attention (k/v: memory_kv_macs)
    ffn = 2 * T * D * 4 * D
    return sa, ca, ffn


def step_overhead_macs(cfg: TransformerConfig) -> int:
    """Count the MACs per step outside the units: input embedding and output head."""
    return 2 * cfg.horizon * cfg.n_emb * cfg.action_dim


def encoder_macs(cfg: TransformerConfig, cond_dim: int, num_steps: int) -> int:
    """Count the condition encoder and cross-attention K/V projections per chunk.

    Both are token-wise. The T_o observation tokens are encoded once per chunk; the K time
    tokens depend only on the schedule and are encoded once per schedule, so they cost nothing
    per chunk (``num_steps`` is kept for the signature's symmetry and ignored).
    """
    D = cfg.n_emb
    mlp = 2 * D * 4 * D
    kv = cfg.n_layer * 2 * D * D
    return cfg.n_obs_steps * (mlp + kv + cond_dim * D)


def pruner_macs(pcfg: PrunerConfig, num_units: int, cond_dim: int, num_steps: int,
                n_obs_steps: int) -> int:
    """Pruner per chunk at batch 1, with the constant parts evaluated once."""
    H, F, U, K = pcfg.hidden_dim, pcfg.dim_feedforward, num_units, num_steps
    tokens = K + n_obs_steps
    once = 4 * U * H * H + 2 * U * U * H + U * H * H  # query self-attention + q projection
    memory = tokens * (cond_dim * H + 2 * H * H)  # memory projection + keys/values
    per_step = 2 * U * (1 + n_obs_steps) * H + U * H * H + 2 * U * H * F + U * H * 4
    return once + memory + K * per_step


def chunk_macs(cfg: TransformerConfig, cond_dim: int, num_steps: int,
               counts: Optional[list] = None, pruner: Optional[PrunerConfig] = None) -> dict:
    """Count the MACs of one chunk.

    Args:
        cfg: transformer config.
        cond_dim: D_o.
        num_steps: K.
        counts: computed units per kind ``[n_sa, n_ca, n_ffn]``; None means dense.
        pruner: pruner config when a pruner ran for this chunk.

    Returns:
        dict with ``transformer`` (encoder + embeddings/head + computed units), ``pruner`` and
        ``total`` MACs.
    """
    per_unit = unit_macs(cfg)
    if counts is None:
        counts = [cfg.n_layer * num_steps] * 3
    units = sum(n * m for n, m in zip(counts, per_unit))
    transformer = (encoder_macs(cfg, cond_dim, num_steps) + units
                   + num_steps * step_overhead_macs(cfg))
    pr = 0 if pruner is None else pruner_macs(pruner, 3 * cfg.n_layer, cfg.n_emb, num_steps,
                                              cfg.n_obs_steps)
    return {'transformer': transformer, 'pruner': pr, 'total': transformer + pr}
