"""Diffusion Policy transformer (DP-T) with an explicit per-unit API.

Layout and parameter names follow Diffusion Policy's ``TransformerForDiffusion`` with
``time_as_cond=True``, ``obs_as_cond=True``, ``n_cond_layers=0`` (Chi et al. 2023), so that
published checkpoints map onto it one-to-one (see :mod:`dp_import`):

    memory  m = MLP(concat(SinEmb(t), Linear(o)) + cond_pos_emb)         (B, T_c, D)
    x       = Linear(a_k) + pos_emb                                        (B, T_a, D)
    for l in layers:  x = x + SA_l(LN1 x);  x = x + CA_l(LN2 x, m);  x = x + FFN_l(LN3 x)
    eps     = head(ln_f(x))                                                (B, T_a, A)

Test-time sparsity skips or reuses the residual *branches* SA_l, CA_l, FFN_l. Instead of
monkey-patching ``nn.TransformerDecoderLayer`` (as the reference code does), every branch is a
method: :meth:`DecoderLayer.branch` returns the branch output *before* it is added to the
residual stream, and :meth:`DPTransformer.forward` is literally the composition of those calls.
Unit ``b`` of the flattened index is layer ``b // 3``, kind ``b % 3`` (0 SA, 1 CA, 2 FFN).
"""

import math
from typing import List
from typing import Tuple

from sparse_policy_node.core.config import TransformerConfig
import torch
from torch import nn
import torch.nn.functional as F

SA, CA, FFN = 0, 1, 2
UNIT_KINDS = ('sa', 'ca', 'ffn')


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer positions (DP's ``SinusoidalPosEmb``).

    Args:
        positions: (N,) timesteps or indices.
        dim: even embedding size.

    Returns:
        (N, dim) ``[sin, cos]`` halves concatenated, base 10000.
    """
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=positions.device) * -scale)
    args = positions.float()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat((args.sin(), args.cos()), dim=-1)


def causal_mask(horizon: int) -> torch.Tensor:
    """(T_a, T_a) additive mask: action token i attends to tokens j <= i."""
    allowed = torch.tril(torch.ones(horizon, horizon, dtype=torch.bool))
    return torch.zeros(horizon, horizon).masked_fill(~allowed, float('-inf'))


def memory_mask(horizon: int, n_cond: int) -> torch.Tensor:
    """(T_a, T_c) additive mask of DP: action i sees cond token s iff i >= s - 1.

    The time token (s = 0) is always visible; observation token j (s = j + 1) from action j on.
    """
    i = torch.arange(horizon)[:, None]
    s = torch.arange(n_cond)[None, :]
    return torch.zeros(horizon, n_cond).masked_fill(~(i >= s - 1), float('-inf'))


# The decoder units run thousands of times per chunk at batch 1, where nn.Module's call
# machinery costs as much as a small kernel: the hot paths call the functional ops on the
# modules' parameters instead (same ops, same results) and skip dropout outside training.


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` without the module-call overhead."""
    return F.linear(x, module.weight, module.bias)


def layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` without the module-call overhead."""
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


class Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names.

    ``in_proj_weight`` stacks the q, k, v projections as (3D, D), so Diffusion Policy state
    dicts load without renaming. The forward is written with ``scaled_dot_product_attention``
    because ``nn.MultiheadAttention``'s Python dispatch dominates at batch 1 and 10 tokens.
    """

    def __init__(self, dim: int, n_head: int, dropout: float):
        super().__init__()
        self.dim = dim
        self.n_head = n_head
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def self_attend(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Self-attention of (B, T, D) normalized tokens under an additive (T, T) mask."""
        B, T, D = h.shape
        qkv = F.linear(h, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3D)
        q, k, v = qkv.view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        return self._attend(q, k, v, mask)

    def memory_kv(self, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Key/value heads of memory tokens.

        Args:
            memory: (B, T_c, D).

        Returns:
            k, v: each (B, n_head, T_c, D / n_head).
        """
        B, S, D = memory.shape
        kv = F.linear(memory, self.in_proj_weight[D:], self.in_proj_bias[D:])  # (B, T_c, 2D)
        k, v = kv.view(B, S, 2, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        return k, v

    def cross_attend(self, h: torch.Tensor, kv: Tuple[torch.Tensor, torch.Tensor],
                     mask: torch.Tensor) -> torch.Tensor:
        """Cross-attention of (B, T, D) queries to precomputed memory heads ``kv``."""
        B, T, D = h.shape
        q = F.linear(h, self.in_proj_weight[:D], self.in_proj_bias[:D])  # (B, T, D)
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        return self._attend(q, kv[0], kv[1], mask)

    def _attend(self, q, k, v, mask):
        B, n_head, T, dh = q.shape
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return linear(self.out_proj, out.transpose(1, 2).reshape(B, T, n_head * dh))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer (``nn.TransformerDecoderLayer`` names, GELU, norm_first)."""

    def __init__(self, dim: int, n_head: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(dim, n_head, dropout)
        self.multihead_attn = Attention(dim, n_head, dropout)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def sa(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Self-attention branch: (B, T_a, D) residual -> (B, T_a, D) branch output."""
        return self._drop(self.self_attn.self_attend(layer_norm(self.norm1, x), mask))

    def ca(self, x: torch.Tensor, kv: Tuple[torch.Tensor, torch.Tensor],
           mask: torch.Tensor) -> torch.Tensor:
        """Cross-attention branch on memory heads ``kv`` (see :meth:`Attention.memory_kv`)."""
        return self._drop(self.multihead_attn.cross_attend(layer_norm(self.norm2, x), kv, mask))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """Feed-forward branch: Linear -> GELU -> Linear, dropout after each as in torch."""
        h = self._drop(F.gelu(linear(self.linear1, layer_norm(self.norm3, x))))
        return self._drop(linear(self.linear2, h))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) if self.training else x


class DPTransformer(nn.Module):
    """DP-T noise predictor with condition encoder, decoder units and output head."""

    def __init__(self, config: TransformerConfig, cond_dim: int):
        super().__init__()
        self.config = config
        D, T_a, T_c = config.n_emb, config.horizon, 1 + config.n_obs_steps
        self.n_emb = D
        self.input_emb = nn.Linear(config.action_dim, D)
        self.pos_emb = nn.Parameter(torch.zeros(1, T_a, D))
        self.cond_obs_emb = nn.Linear(cond_dim, D)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, T_c, D))
        self.drop = nn.Dropout(config.p_drop_emb)
        # n_cond_layers = 0: a token-wise MLP, no attention in the encoder.
        self.encoder = nn.Sequential(nn.Linear(D, 4 * D), nn.Mish(), nn.Linear(4 * D, D))
        self.layers = nn.ModuleList(DecoderLayer(D, config.n_head, config.p_drop_attn)
                                    for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.action_dim)
        self.register_buffer('mask', causal_mask(T_a), persistent=False)
        self.register_buffer('memory_mask', memory_mask(T_a, T_c), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # DP's init: normal(0, 0.02) for linears, zero biases; LayerNorm to identity.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Attention):
            nn.init.normal_(module.in_proj_weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, DPTransformer):
            nn.init.normal_(module.pos_emb, mean=0.0, std=0.02)
            nn.init.normal_(module.cond_pos_emb, mean=0.0, std=0.02)

    @property
    def num_units(self) -> int:
        """U = 3 * n_layer."""
        return 3 * len(self.layers)

    # ==== condition encoder ====

    def encode_condition(self, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Memory of DP's forward.

        Args:
            timesteps: (B,) diffusion timesteps.
            cond: (B, T_o, D_o) observation features.

        Returns:
            (B, T_c, D) memory tokens.
        """
        time_tok = sinusoidal_embedding(timesteps, self.n_emb)[:, None]  # (B, 1, D)
        tokens = torch.cat((time_tok, self.cond_obs_emb(cond)), dim=1)  # (B, T_c, D)
        return self.encoder(self.drop(tokens + self.cond_pos_emb))

    def encode_condition_parts(self, timesteps: torch.Tensor, cond: torch.Tensor):
        """Memory split into its step-dependent and observation-dependent tokens.

        The encoder is token-wise, so the observation tokens of the memory are identical for
        every denoising step and the time token does not depend on the observation. Encoding
        the two parts separately is exact and costs K + B * T_o token passes instead of
        B * K * T_c.

        Args:
            timesteps: (K,) inference timesteps in execution order.
            cond: (B, T_o, D_o) observation features.

        Returns:
            time_mem: (K, D) memory time token of every step.
            obs_mem: (B, T_o, D) memory observation tokens (shared by all steps).
        """
        return self.encode_time_tokens(timesteps.to(cond.device)), self.encode_obs_tokens(cond)

    def encode_time_tokens(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(K,) timesteps -> (K, D) memory time tokens; independent of the observation."""
        time_tok = sinusoidal_embedding(timesteps, self.n_emb)  # (K, D)
        return self.encoder(self.drop(time_tok + self.cond_pos_emb[0, :1]))

    def encode_obs_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, T_o, D_o) observation features -> (B, T_o, D) memory observation tokens."""
        obs_tok = self.cond_obs_emb(cond) + self.cond_pos_emb[:, 1:]  # (B, T_o, D)
        return self.encoder(self.drop(obs_tok))

    @staticmethod
    def assemble_memory(time_mem: torch.Tensor, obs_mem: torch.Tensor) -> torch.Tensor:
        """(K, D) time tokens + (B, T_o, D) obs tokens -> (B, K, T_c, D) memory of every step."""
        B, T_o, D = obs_mem.shape
        K = time_mem.shape[0]
        time_part = time_mem[None, :, None].expand(B, K, 1, D)  # (B, K, 1, D)
        obs_part = obs_mem[:, None].expand(B, K, T_o, D)  # (B, K, T_o, D)
        return torch.cat((time_part, obs_part), dim=2)  # (B, K, T_c, D)

    def encode_condition_all_steps(self, timesteps: torch.Tensor,
                                   cond: torch.Tensor) -> torch.Tensor:
        """Memory for every denoising step in one batched call (exact: it ignores a_k).

        Args:
            timesteps: (K,) inference timesteps in execution order.
            cond: (B, T_o, D_o) observation features.

        Returns:
            (B, K, T_c, D) memory of every step; ``[:, k]`` equals :meth:`encode_condition`
            at ``timesteps[k]`` up to float rounding.
        """
        return self.assemble_memory(*self.encode_condition_parts(timesteps, cond))

    # ==== decoder units ====

    def embed_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """(B, T_a, A) noisy actions -> (B, T_a, D) residual stream input."""
        x = linear(self.input_emb, sample) + self.pos_emb
        return self.drop(x) if self.training else x

    def memory_kv_all_steps(self, time_mem: torch.Tensor,
                            obs_mem: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of every layer for every step, in one batched pass.

        Like the encoder, the key/value projections are token-wise: K time tokens and
        B * T_o observation tokens are projected once per layer, instead of B * K * T_c tokens
        inside each of the K * L cross-attention calls.

        Args:
            time_mem: (K, D) memory time tokens.
            obs_mem: (B, T_o, D) memory observation tokens.

        Returns:
            per layer (k, v), each (B, K, n_head, T_c, D / n_head); ``[:, step]`` is the
            ``kv`` argument of :meth:`DecoderLayer.ca` at that step.
        """
        return self.assemble_kv(self.time_kv(time_mem), self.obs_kv(obs_mem))

    def time_kv(self, time_mem: torch.Tensor) -> list:
        """Per layer (k, v) of the (K, D) time tokens, each (1, n_head, K, D / n_head)."""
        return [blk.multihead_attn.memory_kv(time_mem[None]) for blk in self.layers]

    def obs_kv(self, obs_mem: torch.Tensor) -> list:
        """Per layer (k, v) of (B, T_o, D) observation tokens, each (B, n_head, T_o, dh)."""
        return [blk.multihead_attn.memory_kv(obs_mem) for blk in self.layers]

    @staticmethod
    def assemble_kv(time_kv: list, obs_kv: list) -> list:
        """Combine time and observation keys/values into per-step (B, K, nh, T_c, dh) pairs."""
        out = []
        for (k_t, v_t), (k_o, v_o) in zip(time_kv, obs_kv):
            B, nh, T_o, dh = k_o.shape
            K = k_t.shape[2]
            pair = []
            for t_part, o_part in ((k_t, k_o), (v_t, v_o)):
                t_part = t_part.permute(0, 2, 1, 3)[:, :, :, None].expand(B, K, nh, 1, dh)
                o_part = o_part[:, None].expand(B, K, nh, T_o, dh)
                pair.append(torch.cat((t_part, o_part), dim=3))  # (B, K, nh, T_c, dh)
            out.append(tuple(pair))
        return out

    def unit(self, layer: int, kind: int, x: torch.Tensor, memory: torch.Tensor = None,
             kv: Tuple[torch.Tensor, torch.Tensor] = None) -> torch.Tensor:
        """Compute one residual unit and return its branch output (not added to ``x``).

        Args:
            layer: decoder layer l.
            kind: 0 self-attention, 1 cross-attention, 2 feed-forward.
            x: (B, T_a, D) residual stream before the unit.
            memory: (B, T_c, D) condition memory (cross-attention only), or
            kv: this layer's precomputed memory keys/values, each (B, n_head, T_c, D / n_head).

        Returns:
            (B, T_a, D) branch output d, so that the dense update is ``x + d``.
        """
        blk = self.layers[layer]
        if kind == SA:
            return blk.sa(x, self.mask)
        if kind == CA:
            if kv is None:
                kv = blk.multihead_attn.memory_kv(memory)
            return blk.ca(x, kv, self.memory_mask)
        if kind == FFN:
            return blk.ffn(x)
        raise ValueError(f'unit kind must be 0 (SA), 1 (CA) or 2 (FFN), got {kind!r}')

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T_a, D) final residual -> (B, T_a, A) predicted noise."""
        return linear(self.head, layer_norm(self.ln_f, x))

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor,
                cond: torch.Tensor) -> torch.Tensor:
        """Dense forward, the composition of :meth:`unit` calls.

        Args:
            sample: (B, T_a, A) noisy normalized actions.
            timesteps: (B,) or scalar diffusion timesteps.
            cond: (B, T_o, D_o) observation features.

        Returns:
            (B, T_a, A) predicted noise.
        """
        B = sample.shape[0]
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(B)
        memory = self.encode_condition(timesteps, cond)
        x = self.embed_sample(sample)
        for layer in range(len(self.layers)):
            for kind in (SA, CA, FFN):
                x = x + self.unit(layer, kind, x, memory)
        return self.output(x)

    def unit_index_names(self) -> List[str]:
        """Names ``'l{layer}.{sa|ca|ffn}'`` of the U units in flattened order."""
        return [f'l{b // 3}.{UNIT_KINDS[b % 3]}' for b in range(self.num_units)]
