"""Attention paths of ForwardBatch against PyTorch's SDPA reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.worker.batch import _grouped_attention


@pytest.mark.parametrize("heads, kv_heads, length", [(4, 1, 1), (4, 2, 1), (8, 8, 5), (6, 2, 7)])
def test_grouped_attention_matches_sdpa(heads, kv_heads, length):
    g = torch.Generator().manual_seed(heads * 10 + length)
    batch, keys, dim = 3, 11, 16
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, kv_heads, keys, dim, generator=g)
    v = torch.randn(batch, kv_heads, keys, dim, generator=g)
    mask = torch.rand(batch, 1, length, keys, generator=g) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert torch.allclose(_grouped_attention(q, k, v, mask, 0.3, None), expected, atol=1e-5)


def test_softcap_bounds_scores():
    q = torch.full((1, 2, 1, 4), 10.0)
    k = torch.randn(1, 1, 5, 4)
    v = torch.randn(1, 1, 5, 4)
    capped = _grouped_attention(q, k, v, None, 1.0, softcap=2.0)
    scores = torch.tanh((q.view(1, 1, 2, 4) @ k.transpose(-1, -2)) / 2.0) * 2.0
    expected = (scores.softmax(-1) @ v).view(1, 2, 1, 4)
    assert torch.allclose(capped, expected, atol=1e-6)
