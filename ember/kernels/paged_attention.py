"""Decode attention read straight from the paged KV cache (paged_attention.cpp).

Gathering every sequence's blocks into a padded [B, K, Hkv, D] tensor costs a full copy of the batch's
context per layer and step; the kernel reads blocks in place. Used for one-query-per-sequence segments;
ForwardBatch falls back to gather + batched matmuls where the kernel does not apply.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ember.kernels.build import load_kernel


def paged_attention_module() -> ModuleType | None:
    return load_kernel("paged_attention", "avx512f")


def kernel_applies(k_pool: torch.Tensor) -> bool:
    """For a KV pool [num_blocks, block_size, Hkv, D] (queries come in the same dtype)."""
    return (
        k_pool.device.type == "cpu"
        and k_pool.dtype in (torch.float32, torch.bfloat16)
        and k_pool.shape[-1] % 16 == 0
        and paged_attention_module() is not None
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """q: [B, H, D] -> [B, H, D]; sequence b attends to positions [key_start[b], key_end[b])."""
    return paged_attention_module().paged_decode_attention(
        q, k_pool, v_pool, block_tables, key_start, key_end, scale, softcap or 0.0
    )
