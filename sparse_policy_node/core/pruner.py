"""TTS pruner: predicts a 4-way gate for every (denoising step, unit) of one chunk.

Architecture (tts_method.md §5): queries are fixed sinusoidal embeddings of the U unit indices;
the memory of step k is the DP-T condition encoder's own output for that step ("shared
encoder"); one pre-norm decoder layer (query self-attention, cross-attention to the step
memory, ReLU FFN) and a linear head give logits (B, K, U, 4) over
{compute, reuse-forward, reuse-timestep, reuse-rollout}. No step-axis flip: gate k is predicted
from memory k.

Where the paper's pruner spends ~6.6 GMAC per chunk (83% of the dense DP-T), this one exploits
what is constant:

- the queries are constant, so query self-attention and the query projection of
  cross-attention run once per call, not once per (sample, step);
- the memory of step k is [time token of t_k, observation tokens]; observation tokens are the
  same for every step and time tokens the same for every sample, so their projections and
  keys/values cost K + B * T_o token passes instead of B * K * T_c;
- a narrower default width (H = 64, FFN 128).

Only the attention output projection, the FFN and the head run per (sample, step, unit).
"""

import math

from sparse_policy_node.core.config import PrunerConfig
from sparse_policy_node.core.transformer import Attention
from sparse_policy_node.core.transformer import sinusoidal_embedding
import torch
from torch import nn
import torch.nn.functional as F

NUM_CHOICES = 4


class Pruner(nn.Module):
    """Gate predictor over (step, unit) for all K steps of a chunk in one batched call."""

    def __init__(self, config: PrunerConfig, num_units: int, cond_dim: int):
        super().__init__()
        H = config.hidden_dim
        self.config = config
        self.num_units = num_units
        self.cond_dim = cond_dim
        # (sampler, K) the pruner was trained for (set from metadata by load_pruner); None:
        # unknown, usable on any schedule without a check.
        self.schedule = None
        self.metadata = {}
        self.n_head = config.n_head
        self.memory_proj = nn.Linear(cond_dim, H)
        self.register_buffer('queries', sinusoidal_embedding(torch.arange(num_units), H),
                             persistent=False)
        self.norm1 = nn.LayerNorm(H)
        self.self_attn = Attention(H, config.n_head, config.dropout)
        self.norm2 = nn.LayerNorm(H)
        self.cross_attn = Attention(H, config.n_head, config.dropout)
        self.norm3 = nn.LayerNorm(H)
        self.linear1 = nn.Linear(H, config.dim_feedforward)
        self.linear2 = nn.Linear(config.dim_feedforward, H)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(H, NUM_CHOICES)
        # Xavier weights and zero biases on the input and output projections, as the paper's.
        for lin in (self.memory_proj, self.head):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, time_mem: torch.Tensor, obs_mem: torch.Tensor) -> torch.Tensor:
        """Predict gate logits for every step of a chunk.

        Args:
            time_mem: (K, D) memory time token of every step (from
                ``DPTransformer.encode_condition_parts``).
            obs_mem: (B, T_o, D) memory observation tokens.

        Returns:
            (B, K, U, 4) logits over {compute, forward, timestep, rollout}.
        """
        K, B, T_o = time_mem.shape[0], obs_mem.shape[0], obs_mem.shape[1]
        H, nh = self.config.hidden_dim, self.n_head
        dh = H // nh
        # Constant part, once per call: query self-attention and query projection.
        q0 = self.queries[None]  # (1, U, H)
        no_mask = torch.zeros(self.num_units, self.num_units, device=q0.device)
        z = q0 + self.drop(self.self_attn.self_attend(self.norm1(q0), no_mask))  # (1, U, H)
        w_in, b_in = self.cross_attn.in_proj_weight, self.cross_attn.in_proj_bias
        q = F.linear(self.norm2(z), w_in[:H], b_in[:H])[0].view(-1, nh, dh)  # (U, nh, dh)
        # Keys / values of the memory: K time tokens, B * T_o observation tokens.
        kv_t = F.linear(self.memory_proj(time_mem), w_in[H:], b_in[H:])  # (K, 2H)
        kv_o = F.linear(self.memory_proj(obs_mem), w_in[H:], b_in[H:])  # (B, T_o, 2H)
        k_t, v_t = kv_t.view(K, 2, nh, dh).unbind(1)  # (K, nh, dh) each
        k_o, v_o = kv_o.view(B, T_o, 2, nh, dh).unbind(2)  # (B, T_o, nh, dh) each
        scale = 1.0 / math.sqrt(dh)
        s_t = torch.einsum('uhd,khd->khu', q, k_t) * scale  # (K, nh, U)
        s_o = torch.einsum('uhd,bjhd->bhuj', q, k_o) * scale  # (B, nh, U, T_o)
        scores = torch.cat((s_t[None, :, :, :, None].expand(B, K, nh, self.num_units, 1),
                            s_o[:, None].expand(B, K, nh, self.num_units, T_o)),
                           dim=-1)  # (B, K, nh, U, T_c)
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.config.dropout > 0:
            attn = F.dropout(attn, self.config.dropout)
        out = attn[..., :1] * v_t[None, :, :, None]  # (B, K, nh, U, dh)
        out = out + torch.einsum('bkhuj,bjhd->bkhud', attn[..., 1:], v_o)
        out = out.transpose(2, 3).reshape(B, K, self.num_units, H)  # (B, K, U, H)
        z = z[None] + self.drop(self.cross_attn.out_proj(out))  # (B, K, U, H)
        z = z + self.drop(self.linear2(self.drop(F.relu(self.linear1(self.norm3(z))))))
        return self.head(z)  # (B, K, U, 4)
