"""ForwardBatch: the flattened tokens of one step, plus what attention needs to find their keys in the
paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ember.kernels.paged_attention import kernel_applies, paged_attention
from ember.worker.kv_cache import PagedKVCache


# Without the paged kernel (another device, no compiler), decode sequences share one gathered call and each
# longer prefill chunk gets its own SDPA call. With it, every sequence goes through the kernel whatever its
# query count: its per-row arithmetic does not depend on the batch or on how a prompt is chunked (batch
# invariance), and it is as fast as SDPA at 512-token chunks and 1.5x faster at 2000 (BENCHMARKS.md).
@dataclass
class _Segment:
    """Sequences attended to in one call: every sequence together in the paged kernel, or (without the
    kernel) all decode sequences together, and each longer prefill chunk alone. Padding stays small:
    short rows are never padded to a chunk's length."""

    seqs: list[int]
    rows: torch.Tensor | None  # token rows of these sequences in the flat batch (None: all, in order)
    query_len: int | None  # queries per sequence; None for the paged kernel's segment (they vary)


@dataclass
class _PagedLayout:
    """Inputs of the paged kernel for one segment in one layer group."""

    block_tables: torch.Tensor  # [B, nb]
    query_starts: torch.Tensor  # [B + 1] rows of each sequence's queries within the segment
    key_ends: torch.Tensor  # [B] one past each sequence's last position


@dataclass
class _KeyLayout:
    """Where one segment's keys are in one layer group, shared by every layer of the group: either
    inputs for the paged kernel, or a block table to gather (or slice) plus a mask."""

    block_table: torch.Tensor | None = None  # [B, nb]
    consecutive_first: int | None = None  # first block id when a single sequence's blocks are consecutive
    num_keys: int = 0  # key positions read (a single sequence's keys are cut at its end)
    mask: torch.Tensor | None = None  # [B, 1, L, num_keys]
    paged: _PagedLayout | None = None


@dataclass
class ForwardBatch:
    """One model step over several sequences, tokens flattened (no padding in projections or MLP).

    Sequence b contributes `query_lens[b]` tokens at positions `start_positions[b]`..; `block_tables[g][b]`
    lists its KV blocks in layer group g (0 for blocks outside a sliding window).
    """

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    start_positions: list[int]  # [B] tokens already in the cache before this step
    query_lens: list[int]  # [B] new tokens this step
    block_tables: list[list[list[int]]]  # [group][B][blocks]
    logits_indices: torch.Tensor  # rows of the hidden states whose logits are needed
    kv_cache: PagedKVCache
    skip_layers: frozenset[int] = frozenset()  # layers the model passes over (a layer-skip draft)
    # With the paged kernel: None sends every sequence to it; a number sends longer chunks to SDPA instead
    # (not batch invariant; benchmarks compare the two routes with it).
    max_paged_queries: int | None = None
    _slot_mappings: list[torch.Tensor] = field(init=False)
    _segments: list[_Segment] = field(init=False)
    _layouts: dict[tuple[int, int, int | None], _KeyLayout] = field(init=False, default_factory=dict)
    _paged_kernel: bool = field(init=False)

    def __post_init__(self) -> None:
        self._paged_kernel = kernel_applies(self.kv_cache.keys[0], self.kv_cache.dtype)
        block_size = self.kv_cache.block_size
        positions = self.positions.tolist()
        owners = [b for b, n in enumerate(self.query_lens) for _ in range(n)]
        self._slot_mappings = []
        for group, tables in enumerate(self.block_tables):
            used = torch.tensor([0] + [i for table in tables for i in table], dtype=torch.long)  # 0: padding
            self.kv_cache.initialize_blocks(group, used.to(self.input_ids.device))
            slots = [tables[b][p // block_size] * block_size + p % block_size for b, p in zip(owners, positions)]
            self._slot_mappings.append(torch.tensor(slots, dtype=torch.long, device=self.input_ids.device))
        self._segments = self._make_segments()

    @property
    def end_positions(self) -> list[int]:
        return [s + n for s, n in zip(self.start_positions, self.query_lens)]

    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:
        """Store this step's k/v in the cache, then attend. q: [T, H, D], k/v: [T, Hkv, D] -> [T, H, D]."""
        group = self.kv_cache.group_of_layer[layer]
        self.kv_cache.write(layer, self._slot_mappings[group], k, v)
        if len(self._segments) == 1:
            return self._attend(0, group, layer, q, scale, sliding_window, softcap)
        out = torch.empty_like(q)
        for index, segment in enumerate(self._segments):
            out[segment.rows] = self._attend(index, group, layer, q[segment.rows], scale, sliding_window, softcap)
        return out

    def _attend(
        self, index: int, group: int, layer: int, q: torch.Tensor, scale: float, window: int | None, softcap: float | None
    ) -> torch.Tensor:
        segment = self._segments[index]
        layout = self._layout(index, group, window)
        if layout.paged is not None:
            paged, cache = layout.paged, self.kv_cache
            keys, values = cache.keys[layer], cache.values[layer]
            scales = cache.key_scales[layer], cache.value_scales[layer]  # None unless quantized
            args = (paged.block_tables, paged.query_starts, paged.key_ends, scale, window, softcap)
            return paged_attention(q, keys, values, *args, *scales)
        if layout.consecutive_first is not None:
            keys, values = self.kv_cache.slice(layer, layout.consecutive_first, layout.block_table.shape[1])
        else:
            keys, values = self.kv_cache.gather(layer, layout.block_table)
        keys, values = keys[:, : layout.num_keys], values[:, : layout.num_keys]
        batch = len(segment.seqs)
        query = q.view(batch, segment.query_len, *q.shape[1:]).transpose(1, 2)  # [B, H, L, D]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, K, D]
        if softcap or segment.query_len == 1:
            out = _grouped_attention(query, keys, values, layout.mask, scale, softcap)
        else:
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=layout.mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)

    def _make_segments(self) -> list[_Segment]:
        device = self.input_ids.device
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        most = 1
        if self._paged_kernel:
            most = max(self.query_lens, default=0) if self.max_paged_queries is None else self.max_paged_queries
        short = [b for b, n in enumerate(self.query_lens) if 0 < n <= most]
        long = [b for b, n in enumerate(self.query_lens) if n > most]
        segments = []
        if short:
            rows = torch.tensor([r for b in short for r in range(starts[b], starts[b + 1])], dtype=torch.long, device=device)
            segments.append(_Segment(short, rows, None if self._paged_kernel else 1))
        for b in long:
            rows = torch.arange(starts[b], starts[b + 1], device=device)
            segments.append(_Segment([b], rows, self.query_lens[b]))
        if len(segments) == 1 and len(segments[0].rows) == len(self.input_ids):
            segments[0].rows = None
        return segments

    def _layout(self, index: int, group: int, window: int | None) -> _KeyLayout:
        key = (index, group, window)
        if key not in self._layouts:
            self._layouts[key] = self._build_layout(self._segments[index], group, window)
        return self._layouts[key]

    def _build_layout(self, segment: _Segment, group: int, window: int | None) -> _KeyLayout:
        block_size = self.kv_cache.block_size
        device = self.input_ids.device
        all_ends = self.end_positions
        starts = [self.start_positions[b] for b in segment.seqs]
        ends = [all_ends[b] for b in segment.seqs]
        last_block = -(-max(ends) // block_size)
        if segment.query_len is None:
            return _KeyLayout(paged=self._paged_layout(segment, group, ends, last_block))
        # Blocks older than every query's window are not read at all.
        first_block = max(0, min(starts) - window + 1) // block_size if window else 0
        rows = []
        for b in segment.seqs:
            table = self.block_tables[group][b][first_block:last_block]
            rows.append(table + [0] * (last_block - first_block - len(table)))
        consecutive = None
        if len(rows) == 1 and rows[0] == list(range(rows[0][0], rows[0][0] + len(rows[0]))):
            consecutive = rows[0][0]
        key_start = first_block * block_size
        key_end = ends[0] if len(ends) == 1 else last_block * block_size
        mask = _mask(starts, ends, segment.query_len, key_start, key_end, window, device)
        block_table = torch.tensor(rows, dtype=torch.long, device=device)
        return _KeyLayout(block_table, consecutive, key_end - key_start, mask)

    def _paged_layout(self, segment: _Segment, group: int, ends: list[int], last_block: int) -> _PagedLayout:
        device = self.input_ids.device
        tables = [self.block_tables[group][b][:last_block] for b in segment.seqs]
        padded = torch.tensor([t + [0] * (last_block - len(t)) for t in tables], dtype=torch.long, device=device)
        query_starts = [0]
        for b in segment.seqs:
            query_starts.append(query_starts[-1] + self.query_lens[b])
        return _PagedLayout(padded, torch.tensor(query_starts, device=device), torch.tensor(ends, device=device))


def _mask(
    starts: list[int], ends: list[int], length: int, key_start: int, key_end: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B, 1, L, K]: causal, within the sequence, within the window. None when every key is visible."""
    if len(starts) == 1 and length == 1 and key_end == ends[0] and (not window or ends[0] - key_start <= window):
        return None
    q_pos = torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)[None, :]
    k_pos = torch.arange(key_start, key_end, device=device)
    ends_t = torch.tensor(ends, device=device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < ends_t[:, None, None])
    if window:
        mask &= q_pos[:, :, None] - k_pos[None, None, :] < window
    return mask.unsqueeze(1)


def _grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, softcap: float | None
) -> torch.Tensor:
    """Attention as two batched matmuls, each KV head serving its group of query heads in place (no
    repeated K/V). For decode (one query per sequence) this is ~25x faster than CPU SDPA with a mask,
    and it is the path that can soft-cap scores (Gemma 2 style), which SDPA cannot.

    q: [B, H, L, D]; k, v: [B, Hkv, K, D]; mask: [B, 1, L, K] -> [B, H, L, D].
    """
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.view(batch, kv_heads, heads // kv_heads * length, dim)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G*L, K]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.view(batch, kv_heads, heads // kv_heads, length, -1)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).view(batch, kv_heads, heads // kv_heads * length, -1)
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # [B, Hkv, G*L, D]
    return out.view(batch, heads, length, dim)
