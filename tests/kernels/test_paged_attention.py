"""The paged attention kernel (short query blocks over a paged KV cache) against its PyTorch fallback,
its batch invariance, and ForwardBatch's routing of a mixed step through it."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.paged_attention import (
    paged_attention,
    paged_attention_module,
    paged_attention_torch,
    paged_decode_attention,
)
from ember.worker import batch as batch_module
from ember.worker.batch import ForwardBatch
from ember.worker.kv_cache import KV_CACHE_DTYPES, KVGroupSpec, PagedKVCache

needs_kernel = pytest.mark.skipif(paged_attention_module() is None, reason="kernel cannot be built here")

NUM_BLOCKS = 128
# 4: many blocks per sequence; 16: whole 16-key tiles per block (the AMX path for bf16, where the CPU has it).
BLOCK_SIZES = [4, 16]


def _pools(g: torch.Generator, kv_heads: int, dim: int, dtype: torch.dtype, kv_dtype: str, block_size: int = 4) -> tuple:
    """k_pool, v_pool, k_scales, v_scales (None unless quantized) for a random cache."""
    k = torch.randn(NUM_BLOCKS, block_size, kv_heads, dim, generator=g) * 2
    v = torch.randn(NUM_BLOCKS, block_size, kv_heads, dim, generator=g)
    scheme = KV_CACHE_DTYPES[kv_dtype]
    if scheme is None:
        return k.to(dtype), v.to(dtype), None, None
    (k_codes, k_scales), (v_codes, v_scales) = scheme.quantize(k), scheme.quantize(v)
    return k_codes, v_codes, k_scales, v_scales


def _step(
    g: torch.Generator, q_lens: list[int], ends: list[int], block_size: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random distinct block tables (padded with 0), query starts and key ends for one step."""
    ids, tables = (torch.randperm(NUM_BLOCKS - 1, generator=g) + 1).tolist(), []
    for e in ends:
        count = -(-e // block_size)
        tables.append(ids[:count])
        ids = ids[count:]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    starts = torch.tensor([0] + q_lens).cumsum(0)
    return padded, starts, torch.tensor(ends)


CONFIGS = [  # heads, kv_heads, dim, window, softcap
    (4, 1, 32, None, None),
    (12, 2, 48, 7, None),  # 48: the value sum's 16-float remainder
    (8, 8, 32, None, 30.0),
    (6, 2, 256, 5, 20.0),
]


@needs_kernel
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim, window, softcap", CONFIGS)
def test_kernel_matches_fallback(kv_dtype, dtype, heads, kv_heads, dim, window, softcap, block_size):
    g = torch.Generator().manual_seed(heads * 100 + dim + (window or 0))
    k_pool, v_pool, k_scales, v_scales = _pools(g, kv_heads, dim, dtype, kv_dtype, block_size)
    q_lens = [1, 5, 17, 3, 1, 9, 2]
    ends = [13, 5, 40, 3, 1, 29, 16]  # q_len == end: a prefill from position 0
    tables, starts, key_ends = _step(g, q_lens, ends, block_size)
    q = torch.randn(sum(q_lens), heads, dim, generator=g).to(dtype)
    args = (q, k_pool, v_pool, tables, starts, key_ends, 0.2, window, softcap, k_scales, v_scales)
    got, expected = paged_attention(*args), paged_attention_torch(*args)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: both round fp32 results to bf16
    assert got.dtype == dtype
    assert torch.allclose(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


def _reference_row(q, k_pool, v_pool, table, pos, low, scale):  # noqa: ANN001
    """One query row's attention over positions [low, pos], written out position by position."""
    positions = torch.arange(low, pos + 1)
    block_size = k_pool.shape[1]
    blocks = torch.tensor(table)[positions // block_size]
    k = k_pool[blocks, positions % block_size].float().transpose(0, 1)  # [Hkv, n, D]
    v = v_pool[blocks, positions % block_size].float().transpose(0, 1)
    heads, kv_heads = q.shape[0], k.shape[0]
    scores = q.float().view(kv_heads, heads // kv_heads, -1) @ k.transpose(-1, -2) * scale
    return (scores.softmax(-1) @ v).reshape(q.shape)


def test_fallback_is_causal_and_windowed():
    """The fallback (the kernel's reference) against attention written out per query row."""
    g = torch.Generator().manual_seed(0)
    k_pool, v_pool, _, _ = _pools(g, 2, 16, torch.float32, "auto")
    q_lens, ends, window = [3, 1, 6], [10, 7, 6], 4
    tables, starts, key_ends = _step(g, q_lens, ends)
    q = torch.randn(sum(q_lens), 4, 16, generator=g)
    got = paged_attention_torch(q, k_pool, v_pool, tables, starts, key_ends, 0.3, window, None)
    for b, (n, end) in enumerate(zip(q_lens, ends)):
        for j in range(n):
            row, pos = int(starts[b]) + j, end - n + j
            expected = _reference_row(q[row], k_pool, v_pool, tables[b].tolist(), pos, max(0, pos + 1 - window), 0.3)
            assert torch.allclose(got[row], expected, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype, kv_dtype", [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "int8")])
def test_a_sequence_gives_the_same_bits_alone_or_in_any_batch(dtype, kv_dtype, block_size):
    """Batch invariance: alone, in a batch, reordered, with 1 or 2 threads (the kernel splits a lone
    sequence's rows over the threads), decode rows next to long query blocks or next to decode rows only."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, window = 4, 1, 64, 9
    k_pool, v_pool, k_scales, v_scales = _pools(g, kv_heads, dim, dtype, kv_dtype, block_size)
    q_lens, ends = [1, 5, 1, 17, 4], [30, 22, 9, 160, 60]  # alone on 2 threads, 17 x 4 rows are split
    tables, starts, key_ends = _step(g, q_lens, ends, block_size)
    q = torch.randn(sum(q_lens), heads, dim, generator=g).to(dtype)
    pools = (k_pool, v_pool)

    def attend(seqs: list[int]) -> list[torch.Tensor]:
        rows = [q[starts[b] : starts[b + 1]] for b in seqs]
        sub_starts = torch.tensor([0] + [q_lens[b] for b in seqs]).cumsum(0)
        ranges = (tables[seqs], sub_starts, key_ends[seqs])
        out = paged_attention(torch.cat(rows), *pools, *ranges, 0.125, window, None, k_scales, v_scales)
        return list(out.split([q_lens[b] for b in seqs]))

    together = attend(list(range(len(q_lens))))
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for b in range(len(q_lens)):
                assert torch.equal(attend([b])[0], together[b])
            reordered = attend([4, 2, 0, 3, 1])
            for position, b in enumerate([4, 2, 0, 3, 1]):
                assert torch.equal(reordered[position], together[b])
            decode_only = attend([0, 2])
            assert torch.equal(decode_only[0], together[0]) and torch.equal(decode_only[1], together[2])
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_decode_wrapper_is_the_one_query_case():
    g = torch.Generator().manual_seed(2)
    k_pool, v_pool, _, _ = _pools(g, 1, 256, torch.bfloat16, "auto", 16)
    tables, _, key_ends = _step(g, [1, 1, 1], [17, 3, 33], 16)
    q = torch.randn(3, 4, 256, generator=g).bfloat16()
    key_starts = torch.tensor([0, 1, 20])
    decode = paged_decode_attention(q, k_pool, v_pool, tables, key_starts, key_ends, 0.1, None)
    general = paged_attention(q, k_pool, v_pool, tables, torch.arange(4), key_ends, 0.1, None, None, key_starts=key_starts)
    assert torch.equal(decode, general)


@needs_kernel
@pytest.mark.parametrize("dtype, block_size", [(torch.float32, 4), (torch.bfloat16, 16)])
def test_keys_outside_every_window_and_past_the_end_are_not_used(dtype, block_size):
    """NaN in blocks before the window and in slots after a sequence's end: they never reach the output."""
    g = torch.Generator().manual_seed(3)
    k_pool, v_pool, _, _ = _pools(g, 1, 32, dtype, "auto", block_size)
    q_lens, ends, window = [3, 2], [22 + block_size * 3, 14 + block_size * 2], 5
    tables, starts, key_ends = _step(g, q_lens, ends, block_size)
    q = torch.randn(sum(q_lens), 2, 32, generator=g).to(dtype)
    args = (tables, starts, key_ends, 0.3, window, None)
    clean = paged_attention_torch(q, k_pool, v_pool, *args)
    poisoned_k, poisoned_v = k_pool.clone(), v_pool.clone()
    for b, (n, end) in enumerate(zip(q_lens, ends)):
        first_needed = end - n + 1 - window
        for i in range(first_needed // block_size):  # whole blocks before the first query's window
            poisoned_k[tables[b, i]] = poisoned_v[tables[b, i]] = float("nan")
        last, used = tables[b, (end - 1) // block_size], end % block_size or block_size
        poisoned_k[last, used:] = poisoned_v[last, used:] = float("nan")
    got = paged_attention(q, poisoned_k, poisoned_v, *args)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), clean.float(), atol=tolerance, rtol=tolerance)


@needs_kernel
def test_bad_ranges_are_refused():
    g = torch.Generator().manual_seed(4)
    k_pool, v_pool, _, _ = _pools(g, 1, 32, torch.float32, "auto")
    q = torch.randn(3, 1, 32, generator=g)
    tables = torch.tensor([[1, 2]])
    def call(key_end: int) -> None:
        args = (tables, torch.tensor([0, 3]), torch.tensor([0]), torch.tensor([key_end]), 1.0, 0, 0.0)
        paged_attention_module().paged_attention(q, k_pool, v_pool, *args)

    with pytest.raises(RuntimeError, match="no key"):  # 3 queries but only 2 positions
        call(2)
    with pytest.raises(RuntimeError, match="shorter"):  # 12 positions need 3 blocks
        call(12)


# -- ForwardBatch ----------------------------------------------------------------------------------------


def _mixed_step(kv_dtype: str, dtype: torch.dtype, block_size: int) -> tuple[PagedKVCache, dict]:
    """A cache with two layer groups (full attention, and a sliding window) holding random context, and a
    step with decode rows, k+1-token verification rows, a short chunk after a prefix hit and a long prefill."""
    kv_heads, dim = 2, 32
    groups = [KVGroupSpec("full", None, (0,), 64), KVGroupSpec("local", 6, (1,), 64)]
    cache = PagedKVCache(groups, block_size, kv_heads, dim, dtype, "cpu", kv_dtype)
    starts, lens = [20, 33, 7, 0, 50], [1, 5, 1, 40, 12]
    tables, next_block = [], 1
    for s, n in zip(starts, lens):
        count = -(-(s + n) // block_size)
        tables.append(list(range(next_block, next_block + count))[::-1])  # not consecutive
        next_block += count
    step = dict(
        input_ids=torch.zeros(sum(lens), dtype=torch.long),
        positions=torch.tensor([p for s, n in zip(starts, lens) for p in range(s, s + n)]),
        start_positions=starts,
        query_lens=lens,
        block_tables=[tables, tables],
        logits_indices=torch.arange(sum(lens)),
        kv_cache=cache,
    )
    return cache, step


def _fill(cache: PagedKVCache, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in (0, 1):
        shape = cache.keys[layer].shape
        for pool, scales in ((cache.keys[layer], cache.key_scales[layer]), (cache.values[layer], cache.value_scales[layer])):
            values = torch.randn(shape, generator=g)
            if scales is None:
                pool.copy_(values)
            else:
                codes, new_scales = cache.scheme.quantize(values)
                pool.view(torch.uint8).copy_(codes.view(torch.uint8))
                scales.copy_(new_scales)


@needs_kernel
@pytest.mark.parametrize(
    "dtype, kv_dtype, block_size", [(torch.float32, "auto", 8), (torch.bfloat16, "int8", 8), (torch.bfloat16, "auto", 16)]
)
def test_forward_batch_routes_every_sequence_through_one_kernel_call(monkeypatch, dtype, kv_dtype, block_size):
    """Decode, verification, short chunks and the long prefill share one paged segment (batch invariance: a
    row's arithmetic must not depend on its chunk's length); the result matches the per-sequence paths used
    without the kernel (decode rows gathered together, each longer chunk its own SDPA call)."""
    cache, step = _mixed_step(kv_dtype, dtype, block_size)
    g = torch.Generator().manual_seed(6)
    tokens = len(step["input_ids"])
    q = torch.randn(tokens, 4, 32, generator=g).to(dtype)
    k, v = (torch.randn(tokens, 2, 32, generator=g).to(dtype) for _ in range(2))
    outputs = []
    for kernel in (True, False):
        monkeypatch.setattr(batch_module, "kernel_applies", lambda *_: kernel)
        batch = ForwardBatch(**step)
        _fill(cache, seed=7)
        segments = [(s.seqs, s.query_len) for s in batch._segments]  # noqa: SLF001
        if kernel:
            assert segments == [([0, 1, 2, 3, 4], None)]
        else:
            assert segments == [([0, 2], 1), ([1], 5), ([3], 40), ([4], 12)]
        outputs.append([batch.attention(layer, q, k, v, 0.25, window, None) for layer, window in ((0, None), (1, 6))])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for kernel_out, reference in zip(*outputs):
        assert torch.allclose(kernel_out.float(), reference.float(), atol=tolerance, rtol=tolerance)
