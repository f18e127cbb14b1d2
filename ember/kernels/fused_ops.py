"""The small per-token ops of a decoder step in one kernel call each: RMSNorm, the attention prologue
(per-head QK-norm + rotary), and greedy argmax.

At batch-1 decode PyTorch's RMSNorm is ~10 small ops (~11 us on 2 cores), rotary ~7 us per tensor, and
argmax over a 262k vocabulary ~140 us (35 us here); a Gemma 3 token runs 109 norms and 36 rotaries, ~1.5
ms of a ~9 ms step. (The gated activation stays PyTorch's: its vectorized tanh/exp beat a scalar loop.)
fused_ops.cpp does each in one pass with the same roundings as the PyTorch code below, which stays the
fallback (no compiler, not a CPU tensor, EMBER_DISABLE_KERNELS=1) and the reference the kernel is tested
against.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from ember.kernels.build import load_kernel


def fused_ops_module() -> ModuleType | None:
    return load_kernel("fused_ops", "avx512f")


def _uses_kernel(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and x.numel() > 0
        and x.stride(-1) == 1
        and fused_ops_module() is not None
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    """RMSNorm over the last dim of x, computed in float32. `weight` is float32: the multiplier itself
    (1 + w for Gemma's unit offset, whose product is taken in float32 before rounding; Llama's w, applied
    after rounding the normalized x to x's dtype)."""
    if _uses_kernel(x):
        rows = x.reshape(-1, x.shape[-1])  # a view for every caller's layout (contiguous rows)
        return fused_ops_module().rms_norm(rows, weight, eps, unit_offset).view(x.shape)
    return rms_norm_reference(x, weight, eps, unit_offset)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    shape = (x.shape[-1],)
    if unit_offset:
        return F.rms_norm(x.float(), shape, weight, eps).type_as(x)
    return weight.to(x.dtype) * F.rms_norm(x.float(), shape, None, eps).to(x.dtype)


def norm_rotate_heads(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
    unit_offset: bool,
) -> torch.Tensor:
    """x [T, H, D] (any token/head strides) -> optional per-head RMSNorm (QK-norm), then rotary with cos and
    signed sin [T, 1, D] in x's dtype (see `ember.models.layers.rotary`). Returns a contiguous [T, H, D]."""
    if _uses_kernel(x) and cos.dtype == x.dtype and cos.is_contiguous() and sin.is_contiguous():
        return fused_ops_module().qk_rope(x, norm_weight, eps, unit_offset, cos, sin)
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps, unit_offset)
    return rotate_reference(x, cos, sin)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, where rotate_half(x) = [-x2, x1] = [x2, x1] * [-1, 1], the sign being
    folded into sin."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for float32 [N, V] logits (first index of the maximum; NaN wins)."""
    if logits.dim() == 2 and logits.dtype == torch.float32 and logits.is_contiguous() and _uses_kernel(logits):
        return fused_ops_module().argmax(logits)
    return logits.argmax(dim=-1)
