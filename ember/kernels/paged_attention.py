"""Decode attention read straight from the paged KV cache (paged_attention.cpp).

Gathering every sequence's blocks into a padded [B, K, Hkv, D] tensor costs a full copy of the batch's
context per layer and step; the kernel reads blocks in place. Used for one-query-per-sequence segments;
ForwardBatch falls back to gather + batched matmuls where the kernel does not apply.

A quantized pool (int8 or float8_e4m3fn codes, see ember.worker.kv_cache) comes with per-(token, head)
float32 scales; the kernel dequantizes in registers. `paged_decode_attention_torch` is the same
computation in plain PyTorch (the fallback, and the kernel's reference in tests). The module also has
`quantize_write`, PagedKVCache.write's fused quantize-and-store.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ember.kernels.build import load_kernel

_QUANTIZED = (torch.int8, torch.float8_e4m3fn)


def paged_attention_module() -> ModuleType | None:
    return load_kernel("paged_attention", "avx512f")


def kernel_applies(k_pool: torch.Tensor, q_dtype: torch.dtype) -> bool:
    """For a KV pool [num_blocks, block_size, Hkv, D] holding q's dtype or quantized codes."""
    return (
        k_pool.device.type == "cpu"
        and q_dtype in (torch.float32, torch.bfloat16)
        and (k_pool.dtype == q_dtype or k_pool.dtype in _QUANTIZED)
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
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [B, H, D] -> [B, H, D]; sequence b attends to positions [key_start[b], key_end[b]).
    k_scales, v_scales: [num_blocks, block_size, Hkv] when the pools hold quantized codes."""
    args = (q, k_pool, v_pool, block_tables, key_start, key_end, scale)
    if not kernel_applies(k_pool, q.dtype):
        return paged_decode_attention_torch(*args, softcap, k_scales, v_scales)
    return paged_attention_module().paged_decode_attention(*args, softcap or 0.0, k_scales, v_scales)


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    scale: float,
    softcap: float | None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_decode_attention in PyTorch: dequantize the listed blocks, then masked attention in float32."""
    batch, heads, dim = q.shape
    kv_heads = k_pool.shape[2]

    def read(pool: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:  # -> [B, Hkv, K, D] float32
        values = pool[block_tables].float()
        if scales is not None:
            values = values * scales[block_tables].unsqueeze(-1)
        return values.view(batch, -1, kv_heads, dim).transpose(1, 2)

    keys, values = read(k_pool, k_scales), read(v_pool, v_scales)
    positions = torch.arange(keys.shape[2], device=q.device)
    visible = (positions >= key_start[:, None]) & (positions < key_end[:, None])  # [B, K]
    grouped = q.float().view(batch, kv_heads, heads // kv_heads, dim)
    scores = grouped @ keys.transpose(-1, -2) * scale  # [B, Hkv, G, K]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ values).view(batch, heads, dim).to(q.dtype)
