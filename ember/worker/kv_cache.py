"""Paged KV cache: per layer a pool of fixed-size blocks, [num_blocks, block_size, kv_heads, head_dim].

Layers are grouped by attention kind. A sliding-window group holds only the blocks still inside the
window (the block manager frees the rest), so it gets its own, smaller pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVGroupSpec:
    """Layers sharing one block pool and one block table per request."""

    name: str
    window: int | None  # sliding window of these layers, None for full attention
    layers: tuple[int, ...]
    num_blocks: int


def bytes_per_block(block_size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * block_size * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PagedKVCache:
    def __init__(
        self,
        groups: list[KVGroupSpec],
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.groups = groups
        self.block_size = block_size
        self.group_of_layer = {layer: g for g, spec in enumerate(groups) for layer in spec.layers}
        num_layers = len(self.group_of_layer)
        self.keys: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.values: list[torch.Tensor] = [torch.empty(0)] * num_layers
        for spec in groups:
            shape = (spec.num_blocks, block_size, num_kv_heads, head_dim)
            for layer in spec.layers:
                # torch.empty commits no memory up front; blocks are zeroed on first use instead.
                self.keys[layer] = torch.empty(shape, dtype=dtype, device=device)
                self.values[layer] = torch.empty(shape, dtype=dtype, device=device)
        self._initialized = [torch.zeros(spec.num_blocks, dtype=torch.bool, device=device) for spec in groups]

    def initialize_blocks(self, group: int, block_ids: torch.Tensor) -> None:
        """Zero blocks never used before. Attention masks positions past a sequence's end, but a masked
        key's value is still multiplied by weight 0, and never-written memory may hold NaN bit patterns."""
        if block_ids.numel() == 0:
            return
        fresh = block_ids[~self._initialized[group][block_ids]].unique()
        if fresh.numel() == 0:
            return
        for layer in self.groups[group].layers:
            self.keys[layer][fresh] = 0
            self.values[layer][fresh] = 0
        self._initialized[group][fresh] = True

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slot_mapping: [T] flat positions (block * block_size + offset); k, v: [T, Hkv, D]."""
        self.keys[layer].view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
        self.values[layer].view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)

    def gather(self, layer: int, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_table: [B, nb] -> keys, values [B, nb * block_size, Hkv, D] in position order (a copy)."""
        k, v = self.keys[layer][block_table], self.values[layer][block_table]
        batch = block_table.shape[0]
        return k.view(batch, -1, *k.shape[3:]), v.view(batch, -1, *v.shape[3:])

    def slice(self, layer: int, first_block: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of consecutive blocks as a view [1, num_blocks * block_size, Hkv, D] (no copy)."""
        k = self.keys[layer][first_block : first_block + num_blocks]
        v = self.values[layer][first_block : first_block + num_blocks]
        return k.reshape(1, -1, *k.shape[2:]), v.reshape(1, -1, *v.shape[2:])

    def copy_block(self, group: int, source: int, destination: int) -> None:
        """Copy-on-write for a forked sequence's partly filled block, in every layer of the group."""
        for layer in self.groups[group].layers:
            self.keys[layer][destination] = self.keys[layer][source]
            self.values[layer][destination] = self.values[layer][source]
        self._initialized[group][destination] = True

