"""RMSNorm, computed in float32 whatever the weight dtype (both families do this)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        self._offset_weight: torch.Tensor | None = None  # float32 (1 + w), made once after loading

    def process_weights_after_loading(self) -> None:
        if self.unit_offset:
            self._offset_weight = 1.0 + self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if self.unit_offset:
            scale = self._offset_weight if self._offset_weight is not None else 1.0 + self.weight.float()
            return F.rms_norm(x.float(), shape, scale, self.eps).type_as(x)
        return self.weight * F.rms_norm(x.float(), shape, None, self.eps).to(x.dtype)
