"""Paged KV cache: per layer a pool of fixed-size blocks, [num_blocks, block_size, kv_heads, head_dim].

Layers are grouped by attention kind. A sliding-window group holds only the blocks still inside the
window (the block manager frees the rest), so it gets its own, smaller pool.

The pool may hold quantized codes instead of the compute dtype (`kv_cache_dtype` int8 or fp8_e4m3): each
head vector of each token is divided by its own scale (absmax / the code's largest magnitude), kept as
float32 in a parallel [num_blocks, block_size, kv_heads] tensor. One scale per vector follows the
vector's own range (keys and values of different heads and tokens differ by orders of magnitude), costs
4 bytes per head_dim codes, and lets a token be written without touching any other token's codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ember.errors import InvalidRequestError
from ember.kernels.paged_attention import paged_attention_module

_SCALE_DTYPE = torch.float32


@dataclass(frozen=True)
class KVQuantScheme:
    """Symmetric per-vector quantization: code = x / scale with scale = absmax(vector) / max_code."""

    name: str
    storage: torch.dtype
    max_code: float

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., D] -> codes [..., D] (self.storage), scales [...] float32."""
        x = x.float()
        scales = x.abs().amax(-1) / self.max_code
        # An all-zero vector keeps scale 0 (it dequantizes to zeros); divide it by 1, not 0.
        scaled = x / torch.where(scales > 0, scales, 1.0).unsqueeze(-1)
        # Rounding in x / scale can overshoot max_code by an ulp; clamp so int8 cannot wrap.
        scaled = scaled.clamp_(-self.max_code, self.max_code)
        if self.storage == torch.int8:
            scaled = scaled.round_()
        return scaled.to(self.storage), scales

    def error_bound(self, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Largest |dequantize(quantize(x)) - x| per element that the scheme allows (float32 math aside)."""
        s = scales.unsqueeze(-1)
        if self.storage == torch.int8:
            return (s / 2).expand(x.shape)  # round to the nearest integer code
        # e4m3: 3 mantissa bits give a relative error <= 2^-4 for normal codes; below the smallest normal
        # (2^-6) codes are spaced 2^-9 apart, so the error is <= 2^-10 of the scale.
        return torch.maximum(x.float().abs() * 2**-4, s * 2**-10)


KV_CACHE_DTYPES = {
    "auto": None,  # the model's compute dtype, no scales
    "int8": KVQuantScheme("int8", torch.int8, 127.0),
    "fp8_e4m3": KVQuantScheme("fp8_e4m3", torch.float8_e4m3fn, 448.0),
}


def kv_quant_scheme(kv_cache_dtype: str) -> KVQuantScheme | None:
    """The scheme named by EngineConfig.kv_cache_dtype; None for "auto" (the compute dtype)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise InvalidRequestError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[kv_cache_dtype]


def dequantize(codes: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D], scales [...] (None: codes are already values) -> values [..., D] in dtype."""
    if scales is None:
        return codes.to(dtype)
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)


def bytes_per_block(
    block_size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
) -> int:
    """Bytes of keys and values (codes plus scales when quantized) of one block in `num_layers` layers."""
    scheme = kv_quant_scheme(kv_cache_dtype)
    storage = scheme.storage if scheme else dtype
    per_vector = head_dim * storage.itemsize + (_SCALE_DTYPE.itemsize if scheme else 0)
    return 2 * block_size * num_layers * num_kv_heads * per_vector


def _raw(codes: torch.Tensor) -> torch.Tensor:
    """A byte view for copies: PyTorch's CPU index_copy_ has no float8 kernel."""
    return codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes


@dataclass(frozen=True)
class KVGroupSpec:
    """Layers sharing one block pool and one block table per request."""

    name: str
    window: int | None  # sliding window of these layers, None for full attention
    layers: tuple[int, ...]
    num_blocks: int


class PagedKVCache:
    def __init__(
        self,
        groups: list[KVGroupSpec],
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.groups = groups
        self.block_size = block_size
        self.num_kv_heads, self.head_dim, self.device = num_kv_heads, head_dim, device
        self.dtype = dtype  # the model's compute dtype: what gather and slice return
        self.kv_cache_dtype = kv_cache_dtype
        self.scheme = kv_quant_scheme(kv_cache_dtype)
        storage = self.scheme.storage if self.scheme else dtype
        self.group_of_layer = {layer: g for g, spec in enumerate(groups) for layer in spec.layers}
        num_layers = len(self.group_of_layer)
        # keys/values hold codes (or plain values for "auto"); *_scales are None unless quantized.
        self.keys: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.values: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.key_scales: list[torch.Tensor | None] = [None] * num_layers
        self.value_scales: list[torch.Tensor | None] = [None] * num_layers
        for spec in groups:
            shape = (spec.num_blocks, block_size, num_kv_heads, head_dim)
            for layer in spec.layers:
                # torch.empty commits no memory up front; blocks are zeroed on first use instead.
                self.keys[layer] = torch.empty(shape, dtype=storage, device=device)
                self.values[layer] = torch.empty(shape, dtype=storage, device=device)
                if self.scheme is not None:
                    self.key_scales[layer] = torch.empty(shape[:-1], dtype=_SCALE_DTYPE, device=device)
                    self.value_scales[layer] = torch.empty(shape[:-1], dtype=_SCALE_DTYPE, device=device)
        self._initialized = [torch.zeros(spec.num_blocks, dtype=torch.bool, device=device) for spec in groups]

    def scratch_for(self, lengths: list[int]) -> tuple[PagedKVCache, list[list[int]]]:
        """A new cache like this one (layer groups, block size, heads, dtypes) with room for sequences of
        these lengths, and each sequence's block table in it: for a forward outside the engine's requests
        (embeddings, verification), touching no block of theirs."""
        tables, next_block = [], 1  # block 0 is the cache's padding block
        for length in lengths:
            count = -(-length // self.block_size)
            tables.append(list(range(next_block, next_block + count)))
            next_block += count
        groups = [KVGroupSpec(g.name, g.window, g.layers, next_block) for g in self.groups]
        cache = PagedKVCache(groups, self.block_size, self.num_kv_heads, self.head_dim, self.dtype, self.device,
                             self.kv_cache_dtype)  # fmt: skip
        return cache, tables

    def _tensors(self, layer: int) -> list[torch.Tensor]:
        """Every tensor of one layer indexed by block (codes and scales of keys and values)."""
        tensors = [self.keys[layer], self.values[layer], self.key_scales[layer], self.value_scales[layer]]
        return [t for t in tensors if t is not None]

    def initialize_blocks(self, group: int, block_ids: torch.Tensor) -> None:
        """Zero blocks never used before. Attention masks positions past a sequence's end, but a masked
        key's value is still multiplied by weight 0, and never-written memory may hold NaN bit patterns."""
        if block_ids.numel() == 0:
            return
        fresh = block_ids[~self._initialized[group][block_ids]].unique()
        if fresh.numel() == 0:
            return
        for layer in self.groups[group].layers:
            for tensor in self._tensors(layer):
                tensor[fresh] = 0
        self._initialized[group][fresh] = True

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slot_mapping: [T] flat positions (block * block_size + offset); k, v: [T, Hkv, D] (quantized here)."""
        pairs = ((self.keys[layer], self.key_scales[layer], k), (self.values[layer], self.value_scales[layer], v))
        fused = self.scheme is not None and self._fused_write(k)
        for pool, scales, x in pairs:
            if fused:  # same arithmetic as scheme.quantize, in one pass instead of ~10 ops
                paged_attention_module().quantize_write(x, slot_mapping, pool, scales)
                continue
            codes = x
            if self.scheme is not None:
                codes, x_scales = self.scheme.quantize(x)
                scales.view(-1, x.shape[1]).index_copy_(0, slot_mapping, x_scales)
            _raw(pool).view(-1, *x.shape[1:]).index_copy_(0, slot_mapping, _raw(codes))

    def _fused_write(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and paged_attention_module() is not None

    def gather(self, layer: int, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_table: [B, nb] -> keys, values [B, nb * block_size, Hkv, D] in position order (a copy,
        dequantized to the compute dtype; only the listed blocks are read)."""
        return self._read(layer, lambda t: t[block_table], block_table.shape[0])

    def slice(self, layer: int, first_block: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of consecutive blocks as [1, num_blocks * block_size, Hkv, D] (a view unless
        the cache is quantized; then a dequantized copy of just these blocks)."""
        return self._read(layer, lambda t: t[first_block : first_block + num_blocks], 1)

    def _read(
        self, layer: int, select: Callable[[torch.Tensor], torch.Tensor], batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        pairs = ((self.keys[layer], self.key_scales[layer]), (self.values[layer], self.value_scales[layer]))
        for pool, scales in pairs:
            values = select(pool) if scales is None else dequantize(select(pool), select(scales), self.dtype)
            out.append(values.reshape(batch, -1, *pool.shape[2:]))
        return out[0], out[1]

    def copy_block(self, group: int, source: int, destination: int) -> None:
        """Copy-on-write for a forked sequence's partly filled block, in every layer of the group (codes
        and their scales)."""
        for layer in self.groups[group].layers:
            for tensor in self._tensors(layer):
                tensor[destination] = tensor[source]
        self._initialized[group][destination] = True
