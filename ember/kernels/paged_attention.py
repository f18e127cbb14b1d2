"""Attention read straight from the paged KV cache (paged_attention.cpp), for every sequence of a step
with a short block of new queries: decode (one each), speculative verification (k+1), a short prefill
chunk after a prefix hit.

Gathering every sequence's blocks into a padded [B, K, Hkv, D] tensor costs a full copy of the batch's
context per layer and step, and a separate SDPA call per multi-query sequence costs its own gather, mask
and dispatch; the kernel reads blocks in place, all sequences in one call. ForwardBatch keeps SDPA for
long prefills (compute-bound, where its GEMMs win) and falls back to gather + batched matmuls where the
kernel does not apply.

A quantized pool (int8 or float8_e4m3fn codes, see ember.worker.kv_cache) comes with per-(token, head)
float32 scales; the kernel dequantizes in registers. `paged_attention_torch` is the same computation in
plain PyTorch (the fallback, and the kernel's reference in tests). The module also has `quantize_write`,
PagedKVCache.write's fused quantize-and-store.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

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


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    key_ends: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    key_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, H, D] -> [T, H, D]. Sequence b's queries are rows [query_starts[b], query_starts[b + 1]) and
    the last positions before key_ends[b]: query j of n sits at p = key_ends[b] - n + j and attends to
    [max(key_starts[b], p + 1 - window), p + 1) (key_starts default 0; window None: unlimited).
    block_tables: [B, nb]; k_scales, v_scales: [num_blocks, block_size, Hkv] when the pools hold codes."""
    if key_starts is None:
        key_starts = torch.zeros_like(key_ends)
    if not kernel_applies(k_pool, q.dtype):
        return paged_attention_torch(
            q, k_pool, v_pool, block_tables, query_starts, key_ends, scale, window, softcap, k_scales, v_scales, key_starts
        )
    ranges = (block_tables, query_starts, key_starts, key_ends)
    return paged_attention_module().paged_attention(
        q, k_pool, v_pool, *ranges, scale, window or 0, softcap or 0.0, k_scales, v_scales
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
    *,
    use_torch: bool = False,
) -> torch.Tensor:
    """One query per sequence: q [B, H, D]; sequence b attends to positions [key_start[b], key_end[b]).
    `use_torch` runs the PyTorch reference instead of the kernel."""
    query_starts = torch.arange(q.shape[0] + 1, device=q.device)
    args = (q, k_pool, v_pool, block_tables, query_starts, key_end, scale, None, softcap, k_scales, v_scales)
    attend = paged_attention_torch if use_torch else paged_attention
    return attend(*args, key_starts=key_start)


def paged_decode_attention_torch(*args: Any, **kwargs: Any) -> torch.Tensor:
    """paged_decode_attention in PyTorch."""
    return paged_decode_attention(*args, use_torch=True, **kwargs)


def paged_attention_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    key_ends: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    key_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_attention in PyTorch: dequantize the listed blocks, pad each sequence's queries to the longest
    block, then masked attention in float32."""
    tokens, heads, dim = q.shape
    batch, kv_heads = block_tables.shape[0], k_pool.shape[2]
    group = heads // kv_heads
    device = q.device

    def read(pool: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:  # -> [B, Hkv, 1, K, D] float32
        values = pool[block_tables].float()
        if scales is not None:
            values = values * scales[block_tables].unsqueeze(-1)
        return values.view(batch, -1, kv_heads, dim).transpose(1, 2).unsqueeze(2)

    keys, values = read(k_pool, k_scales), read(v_pool, v_scales)
    lengths = query_starts.diff()
    longest = int(lengths.max()) if batch else 0
    owner = torch.repeat_interleave(torch.arange(batch, device=device), lengths)  # [T] sequence of each row
    index = torch.arange(tokens, device=device) - query_starts[owner]  # [T] query index within the sequence
    padded = q.new_zeros(batch, longest, heads, dim, dtype=torch.float32)
    padded[owner, index] = q.float()
    # [B, L] positions; padding rows get the last query's position (they are dropped below).
    query_pos = key_ends[:, None] - lengths[:, None] + torch.arange(longest, device=device).clamp(max=lengths[:, None] - 1)
    key_pos = torch.arange(keys.shape[3], device=device)
    first = torch.zeros_like(key_ends) if key_starts is None else key_starts
    low = first[:, None, None]
    if window:
        low = torch.maximum(low, query_pos[:, :, None] + 1 - window)
    visible = (key_pos >= low) & (key_pos <= query_pos[:, :, None])  # [B, L, K]
    grouped = padded.view(batch, longest, kv_heads, group, dim).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, L, D]
    scores = grouped @ keys.transpose(-1, -2) * scale  # [B, Hkv, G, L, K]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    out = (scores.softmax(-1) @ values).permute(0, 3, 1, 2, 4)  # [B, L, Hkv, G, D]
    return out[owner, index].reshape(tokens, heads, dim).to(q.dtype)
