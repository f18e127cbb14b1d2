"""RMSNorm, computed in float32 whatever the weight dtype (both families do this)."""

from __future__ import annotations

import torch
from torch import nn

from ember.kernels.fused_ops import rms_norm


class RMSNorm(nn.Module):
    """RMS normalization over the last dimension.

    `unit_offset` selects Gemma's variant: the stored weight w scales by (1 + w), and the product is
    taken in float32 before casting back; Llama casts first and then scales by w.
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim), requires_grad=False)
        self._multiplier: torch.Tensor | None = None  # float32 (1 + w) or w, made once after loading

    def process_weights_after_loading(self) -> None:
        self._multiplier = self._make_multiplier()

    def _make_multiplier(self) -> torch.Tensor:
        return (1.0 + self.weight.float()) if self.unit_offset else self.weight.float()

    @property
    def multiplier(self) -> torch.Tensor:
        """The float32 factor applied after normalizing (what the kernel takes)."""
        return self._multiplier if self._multiplier is not None else self._make_multiplier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.multiplier, self.eps, self.unit_offset)
