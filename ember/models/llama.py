"""Llama family: Llama 2/3, Mistral (sliding window), Qwen2 (QKV bias) and Qwen3 (QK-norm) are all this
pre-norm block; their differences are fields of `ModelConfig`."""

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


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    def make_layer(self, config: ModelConfig, layer_idx: int) -> nn.Module:
        return LlamaDecoderLayer(config, layer_idx)
