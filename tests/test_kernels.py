"""The bf16 GEMV / GEMM kernel against a float32 reference, its batch invariance, and its fallback rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.kernels.gemv import MAX_ROWS, gemv_module, linear, uses_kernel
from ember.kernels.paged_attention import paged_attention_module, paged_decode_attention

needs_kernel = pytest.mark.skipif(gemv_module() is None, reason="no avx512_bf16 CPU or compiler here")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 13, 64, 131])
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


@needs_kernel
@pytest.mark.parametrize("out_features, in_features", [(1536, 640), (262, 37), (7, 2048), (103, 96)])
def test_kernel_rows_are_bitwise_batch_invariant(out_features, in_features):
    """Each row alone (the GEMV) equals the same row inside any batch (GEMV up to 8 rows, blocked GEMM beyond,
    where tiles of 6 rows and W blocks cut the batch at different places), with 1 or 2 threads."""
    g = torch.Generator().manual_seed(out_features)
    x = torch.randn(150, in_features, generator=g).bfloat16()
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    alone = torch.cat([linear(x[i : i + 1], w, out_dtype=torch.float32) for i in range(len(x))])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for start, stop in [(0, 150), (3, 11), (7, 70), (0, 5), (149, 150), (20, 81)]:
                assert torch.equal(linear(x[start:stop], w, out_dtype=torch.float32), alone[start:stop])
                assert torch.equal(linear(x[start:stop], w), alone[start:stop].bfloat16())
    finally:
        torch.set_num_threads(threads)


def test_fallback_cases_use_f_linear():
    w = torch.randn(16, 32).bfloat16()
    assert not uses_kernel(torch.randn(MAX_ROWS + 1, 32).bfloat16(), w, invariant=False)  # oneDNN's GEMM
    assert not uses_kernel(torch.randn(1, 32), w.float())  # float32 model
    x = torch.randn(MAX_ROWS + 1, 32).bfloat16()
    assert torch.equal(linear(x, w, invariant=False), F.linear(x, w))


needs_paged = pytest.mark.skipif(paged_attention_module() is None, reason="kernel cannot be built here")


@needs_paged
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, window, softcap", [(4, 1, None, None), (8, 2, 5, None), (4, 4, None, 20.0)])
def test_paged_decode_attention_matches_reference(dtype, heads, kv_heads, window, softcap):
    g = torch.Generator().manual_seed(heads + kv_heads)
    block_size, dim, num_blocks = 4, 32, 40
    k_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    ends = [13, 1, 8]
    tables = [torch.randperm(num_blocks - 1, generator=g)[: -(-e // block_size)].add(1).tolist() for e in ends]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    starts = [max(0, e - window) if window else 0 for e in ends]
    q = torch.randn(len(ends), heads, dim, generator=g).to(dtype)
    got = paged_decode_attention(q, k_pool, v_pool, padded, torch.tensor(starts), torch.tensor(ends), 0.2, softcap)
    for b, (start, end) in enumerate(zip(starts, ends)):
        positions = torch.arange(start, end)
        blocks = torch.tensor(tables[b])[positions // block_size]
        k = k_pool[blocks, positions % block_size].float().transpose(0, 1)  # [Hkv, n, D]
        v = v_pool[blocks, positions % block_size].float().transpose(0, 1)
        qg = q[b].float().view(kv_heads, heads // kv_heads, dim)
        scores = qg @ k.transpose(-1, -2) * 0.2
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        expected = (scores.softmax(-1) @ v).reshape(heads, dim)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got[b].float(), expected, atol=tolerance, rtol=tolerance)
