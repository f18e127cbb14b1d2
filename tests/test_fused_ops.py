"""The RMSNorm / QK-norm + rotary kernel against its PyTorch reference (the fallback), and the model layers
that use it against a from-scratch float64 formula."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.fused_ops import (
    argmax,
    fused_ops_module,
    norm_rotate_heads,
    rms_norm,
    rms_norm_reference,
    rotate_reference,
)
from ember.models.layers.norm import RMSNorm

needs_kernel = pytest.mark.skipif(fused_ops_module() is None, reason="kernel cannot be built here")


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16: the kernel rounds exactly where the reference does, so values agree to the last bit except when
    a float32 sum in another order lands on the other side of a bf16 rounding boundary (1 ulp, rare)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.bfloat16:
        diff = (got.float() - expected.float()).abs()
        ulp = expected.float().abs().clamp_min(1e-30) * 2**-7
        assert bool((diff <= ulp).all())
        assert (got != expected).float().mean().item() < 0.01
    else:
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("unit_offset", [True, False])
@pytest.mark.parametrize("rows, dim", [(1, 640), (3, 1536), (37, 64), (2, 17)])
def test_rms_norm_kernel_matches_reference(dtype, unit_offset, rows, dim):
    g = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim, generator=g) * 4).to(dtype)
    weight = torch.randn(dim, generator=g).to(dtype).float()  # Llama's multiplier is a model-dtype value
    _close(rms_norm(x, weight, 1e-6, unit_offset), rms_norm_reference(x, weight, 1e-6, unit_offset))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("tokens, heads, kv_heads, dim", [(1, 4, 1, 256), (5, 12, 2, 128), (33, 2, 2, 64)])
def test_qk_rope_kernel_matches_reference_on_strided_qkv(dtype, with_norm, tokens, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(tokens * heads + dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    cos = torch.randn(tokens, 1, dim, generator=g).to(dtype)
    sin = torch.randn(tokens, 1, dim, generator=g).to(dtype)
    weight = torch.randn(dim, generator=g) if with_norm else None
    for x, h in ((q, heads), (k, kv_heads)):
        x = x.view(tokens, h, dim)  # strided: rows of qkv
        expected = rotate_reference(rms_norm_reference(x, weight, 1e-6, True) if with_norm else x, cos, sin)
        got = norm_rotate_heads(x, cos, sin, weight, 1e-6, True)
        assert got.is_contiguous()
        _close(got, expected)


@needs_kernel
def test_kernel_rows_do_not_depend_on_the_batch():
    """Batch invariance: a row's result is the same alone or among 300 others."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 640, generator=g).bfloat16()
    weight = torch.randn(640, generator=g)
    full = rms_norm(x, weight, 1e-6, True)
    assert all(torch.equal(full[i : i + 1], rms_norm(x[i : i + 1], weight, 1e-6, True)) for i in (0, 17, 299))


@pytest.mark.parametrize("unit_offset", [True, False])
def test_rms_norm_layer_matches_float64_formula(unit_offset):
    """The layer (kernel or fallback) against the definition, independently of either implementation."""
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, 1e-6, unit_offset=unit_offset)
    norm.weight.data.copy_(torch.randn(96, generator=g))
    norm.process_weights_after_loading()
    x = torch.randn(4, 96, generator=g)
    x64 = x.double()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = normed * (1 + norm.weight.double() if unit_offset else norm.weight.double())
    assert torch.allclose(norm(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_fallback_handles_what_the_kernel_does_not():
    x = torch.randn(3, 8, dtype=torch.float64)  # not a kernel dtype
    weight = torch.randn(8)
    assert torch.equal(rms_norm(x, weight, 1e-6, True), rms_norm_reference(x, weight, 1e-6, True))
    empty = torch.empty(0, 2, 8)
    assert norm_rotate_heads(empty, torch.empty(0, 1, 8), torch.empty(0, 1, 8), None, 1e-6, False).shape == (0, 2, 8)


@needs_kernel
def test_argmax_kernel_matches_torch_including_ties_nan_and_inf():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 262144 + 7, generator=g)
    logits[1, 100] = logits[1, 200_000] = 50.0  # a tie: the first index wins
    logits[2, 262144 + 3] = 60.0  # the maximum in the scalar tail
    logits[3, 77] = float("nan")
    logits[3, 99] = float("nan")
    logits[4] = float("-inf")
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))
    small = torch.tensor([[1.0, 3.0, 3.0], [float("-inf"), -1.0, float("inf")]])
    assert torch.equal(argmax(small), small.argmax(dim=-1))
