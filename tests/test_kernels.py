"""The bf16 GEMV kernel against a float32 reference, and its fallback rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.kernels.gemv import MAX_ROWS, gemv_module, linear, uses_kernel

needs_kernel = pytest.mark.skipif(gemv_module() is None, reason="no avx512_bf16 CPU or compiler here")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("out_features, in_features", [(1536, 640), (13, 100), (262, 37), (4, 32), (7, 2048)])
def test_kernel_matches_float32_reference(rows, out_features, in_features):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16()
    expected = F.linear(x.float(), w.float(), b.float())
    got = linear(x, w, b, out_dtype=torch.float32)
    # Both sum exact products of bf16 values in fp32; only the summation order differs.
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3 * (in_features**0.5))
    assert linear(x, w, b).dtype == torch.bfloat16


@needs_kernel
def test_kernel_handles_3d_inputs_and_noncontiguous_weights():
    x = torch.randn(2, 3, 64).bfloat16()
    w = torch.randn(64, 48).bfloat16().t()  # [48, 64], not contiguous
    assert torch.allclose(linear(x, w).float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)


def test_fallback_cases_use_f_linear():
    w = torch.randn(16, 32).bfloat16()
    assert not uses_kernel(torch.randn(MAX_ROWS + 1, 32).bfloat16(), w)  # big batch: GEMM territory
    assert not uses_kernel(torch.randn(1, 32), w.float())  # float32 model
    x = torch.randn(MAX_ROWS + 1, 32).bfloat16()
    assert torch.equal(linear(x, w), F.linear(x, w))
