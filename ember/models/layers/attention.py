"""Self-attention: fused QKV projection, optional QK-norm, rotary, then the batch's KV cache + attention."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ember.config import ModelConfig
from ember.models.layers.linear import Linear
from ember.models.layers.norm import RMSNorm
from ember.models.layers.rotary import apply_rotary

if TYPE_CHECKING:
    from ember.worker.batch import ForwardBatch


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias, shard_sizes=[q_size, kv_size, kv_size]
        )
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.attention_out_bias)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=config.gemma_norms)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=config.gemma_norms)
        self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.sliding_window = config.sliding_window if config.is_sliding(layer_idx) else None
        self.softcap = config.attn_logit_softcapping

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.shard_sizes, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin, self.q_norm), apply_rotary(k, cos, sin, self.k_norm)
        out = batch.attention(self.layer_idx, q, k, v, self.scale, self.sliding_window, self.softcap)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))
