"""Rotary position embedding (the "rotate half" / NeoX layout used by HF checkpoints)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ember.config import RopeConfig
from ember.kernels.fused_ops import norm_rotate_heads
from ember.models.layers.norm import RMSNorm


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for the step's positions once; every layer of the same kind reuses them."""

    def __init__(self, head_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, rope), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, D], computed in float32 and then cast (as the reference does).

        The returned sin has its first half negated, so `apply_rotary` needs no negation per call."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        cos = torch.cat([freqs, freqs], dim=-1).cos()
        sin = torch.cat([-freqs, freqs], dim=-1).sin()  # sin(-f) = -sin(f)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
    """x: [T, H, D]; cos, signed sin: [T, 1, D] in x's dtype -> [T, H, D]: x (first RMS-normalized per head
    by `norm`, Gemma's and Qwen3's QK-norm) rotated: x*cos + rotate_half(x)*sin, one kernel call."""
    weight, eps, unit_offset = (norm.multiplier, norm.eps, norm.unit_offset) if norm else (None, 0.0, False)
    return norm_rotate_heads(x, cos, sin, weight, eps, unit_offset)
