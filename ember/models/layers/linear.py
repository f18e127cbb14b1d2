"""Linear layers whose weights may be several checkpoint tensors stacked along the output dim.

Fusing q/k/v (and gate/up) into one matmul halves the number of small kernels per layer, which matters
for batch-1 decode where each op costs a dispatch; the checkpoint still stores them separately, so each
shard is copied into its row range at load time.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.errors import CorruptModelError
from ember.kernels import linear


class Linear(nn.Module):
    """y = x W^T (+ b); `shard_sizes` lists the output rows of each stacked checkpoint tensor."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, shard_sizes: list[int] | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.shard_sizes = shard_sizes or [out_features]
        assert sum(self.shard_sizes) == out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Copy one checkpoint tensor (`weight` or `bias`) into its rows of the stacked parameter."""
        param: torch.Tensor = getattr(self, param_name)
        start = sum(self.shard_sizes[:shard])
        rows = self.shard_sizes[shard]
        target = param.data.narrow(0, start, rows)
        if tuple(tensor.shape) != tuple(target.shape):
            raise CorruptModelError(
                f"tensor for {param_name} shard {shard} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(tensor)
