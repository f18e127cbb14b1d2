"""Gated feed-forward block: down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

from __future__ import annotations

import torch
from torch import nn

from ember.models.layers.activation import get_activation
from ember.models.layers.linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, shard_sizes=[intermediate_size] * 2)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)
