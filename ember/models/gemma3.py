"""Gemma 3 (text): like Llama but with norms both before and after attention and MLP, (1 + w) RMSNorm,
GELU-tanh, sqrt(hidden)-scaled embeddings, QK-norm, and interleaved sliding-window/global layers with
their own RoPE bases. The shared pieces read those switches from `ModelConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ember.config import ModelConfig
from ember.models.base import CausalLM
from ember.models.layers.attention import Attention
from ember.models.layers.mlp import GatedMLP
from ember.models.layers.norm import RMSNorm

if TYPE_CHECKING:
    from ember.worker.batch import ForwardBatch


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(dim, eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(dim, eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps, unit_offset=True)
        self.post_feedforward_layernorm = RMSNorm(dim, eps, unit_offset=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, batch))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(CausalLM):
    def make_layer(self, config: ModelConfig, layer_idx: int) -> nn.Module:
        return Gemma3DecoderLayer(config, layer_idx)
