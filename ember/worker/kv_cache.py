"""Contiguous KV cache: each running sequence owns a slot of `max_len` positions in every layer.

Simple and copy-free for batch-1 decode (a slot is a view); the paged cache of the engine-core issue
replaces this class without touching the models (they only call `ForwardBatch.attention`).
"""

from __future__ import annotations

import torch


class ContiguousKVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        shape = (num_slots, max_len, num_kv_heads, head_dim)
        # torch.empty leaves pages untouched, so memory is committed only as positions are written.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._zeroed_slots: set[int] = set()

    def prepare_slots(self, slots: list[int]) -> None:
        """Zero each slot before its first use. Attention reads a batch's slots up to the longest
        sequence and masks the rest, but a masked key's value still gets multiplied by weight 0, and
        never-written memory may hold NaN bit patterns (0 * NaN = NaN). Stale finite values are harmless."""
        for slot in slots:
            if slot not in self._zeroed_slots:
                for cache in (*self.keys, *self.values):
                    cache[slot].zero_()
                self._zeroed_slots.add(slot)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots, positions: [T]; k, v: [T, Hkv, D]."""
        self.keys[layer].index_put_((slots, positions), k)
        self.values[layer].index_put_((slots, positions), v)

    def read(
        self, layer: int, slots: torch.Tensor, slot_range: tuple[int, int] | None, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of positions [start, end) for the batch's slots: [B, end-start, Hkv, D].

        `slot_range` is set when the slots are consecutive, so the read is a view instead of a gather.
        """
        k, v = self.keys[layer], self.values[layer]
        if slot_range is not None:
            first, count = slot_range
            return k[first : first + count, start:end], v[first : first + count, start:end]
        return k[slots, start:end], v[slots, start:end]
