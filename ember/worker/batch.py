"""ForwardBatch: the flattened tokens of one step plus what attention needs to find their keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ember.worker.kv_cache import ContiguousKVCache


@dataclass
class ForwardBatch:
    """One model step over several sequences, tokens flattened (no padding in the projections/MLP).

    Sequence b contributes `query_lens[b]` tokens at positions `start_positions[b]`.. and attends to
    every cached position of its slot up to its last new token.
    """

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: list[int]  # [B] KV-cache slot of each sequence
    start_positions: list[int]  # [B] tokens already in the cache before this step
    query_lens: list[int]  # [B] new tokens this step
    logits_indices: torch.Tensor  # rows of the hidden states whose logits are needed
    kv_cache: ContiguousKVCache
    _token_slots: torch.Tensor = field(init=False)
    _slots_tensor: torch.Tensor = field(init=False)
    _slot_range: tuple[int, int] | None = field(init=False)
    _pad_index: torch.Tensor | None = field(init=False)
    _masks: dict[int | None, tuple[int, torch.Tensor | None]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.kv_cache.prepare_slots(self.slots)
        device = self.input_ids.device
        self._slots_tensor = torch.tensor(self.slots, dtype=torch.long, device=device)
        self._token_slots = torch.repeat_interleave(
            self._slots_tensor, torch.tensor(self.query_lens, device=device), output_size=len(self.input_ids)
        )
        first = self.slots[0]
        consecutive = self.slots == list(range(first, first + len(self.slots)))
        self._slot_range = (first, len(self.slots)) if consecutive else None
        self._pad_index = None
        if len(set(self.query_lens)) > 1:
            max_len = max(self.query_lens)
            rows = [b * max_len + j for b, n in enumerate(self.query_lens) for j in range(n)]
            self._pad_index = torch.tensor(rows, dtype=torch.long, device=device)

    @property
    def num_seqs(self) -> int:
        return len(self.slots)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

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
        self.kv_cache.write(layer, self._token_slots, self.positions, k, v)
        key_start, mask = self._mask(sliding_window)
        keys, values = self.kv_cache.read(layer, self._slots_tensor, self._slot_range, key_start, max(self.end_positions))
        query = self._pad(q).transpose(1, 2)  # [B, H, L, D]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, K, D]
        if softcap:
            out = _softcapped_attention(query, keys, values, mask, scale, softcap)
        else:
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return self._unpad(out.transpose(1, 2))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H, D] -> [B, L, H, D]; a view when every sequence has the same query length."""
        batch, length = self.num_seqs, self.max_query_len
        if self._pad_index is None:
            return x.view(batch, length, *x.shape[1:])
        padded = x.new_zeros(batch * length, *x.shape[1:])
        padded[self._pad_index] = x
        return padded.view(batch, length, *x.shape[1:])

    def _unpad(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self._pad_index is None else flat[self._pad_index]

    def _mask(self, window: int | None) -> tuple[int, torch.Tensor | None]:
        """(first key position read, boolean mask [B, 1, L, K] or None), shared by all layers of a kind."""
        if window not in self._masks:
            self._masks[window] = self._build_mask(window)
        return self._masks[window]

    def _build_mask(self, window: int | None) -> tuple[int, torch.Tensor | None]:
        ends = self.end_positions
        # Keys older than every query's window are not read at all.
        key_start = max(0, min(self.start_positions) - window + 1) if window else 0
        single_decode = self.num_seqs == 1 and self.max_query_len == 1
        if single_decode:
            return key_start, None  # one query sees exactly the keys read
        device = self.input_ids.device
        length = self.max_query_len
        offsets = torch.arange(length, device=device)
        starts = torch.tensor(self.start_positions, device=device)
        lens = torch.tensor(self.query_lens, device=device)
        # Padded query rows get position `start` so they always see one valid key (no NaN rows).
        q_pos = starts[:, None] + torch.where(offsets[None, :] < lens[:, None], offsets[None, :], 0)
        k_pos = torch.arange(key_start, max(ends), device=device)
        ends_t = torch.tensor(ends, device=device)
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < ends_t[:, None, None])
        if window:
            mask &= q_pos[:, :, None] - k_pos[None, None, :] < window
        return key_start, mask.unsqueeze(1)


def _softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, cap: float
) -> torch.Tensor:
    """Attention with tanh soft-capped scores (Gemma 2 style); SDPA cannot cap, so this is explicit."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)).float() * scale / cap) * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype)) @ v
