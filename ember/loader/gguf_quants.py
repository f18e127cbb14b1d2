"""Dequantization of GGUF tensor data to float32 torch tensors.

Each quantized type has a small `_dequant_<type>(blocks)` function: it takes a uint8 tensor of shape
(n_blocks, type_size) and returns float32 of shape (n_blocks, block_size). The arithmetic follows the
order of operations of ggml (and of `gguf.quants`), so the results are bit-identical to it.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ember.errors import CorruptModelError, UnsupportedModelError

_T = GGMLQuantizationType

# Blocks are dequantized this many elements at a time: small enough that the integer and float
# intermediates stay in cache-sized pieces, large enough that the per-chunk Python overhead is noise.
_CHUNK_ELEMENTS = 1 << 20


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) little-endian fp16 bytes -> (n, 1) float32 (copied first: block strides are not 2-aligned)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2, k): low nibbles of all k bytes, then their high nibbles."""
    return torch.stack((b & 0x0F, b >> 4), dim=-2)


# Q8_0, 34 bytes per 32 values: fp16 scale d, then 32 int8 quants. x = d * q.
def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _fp16(blocks[:, :2])
    q = blocks[:, 2:].view(torch.int8).to(torch.float32)
    return q.mul_(d)


# Q5_0, 22 bytes per 32 values: fp16 scale d; 4 bytes qh whose bit j is the 5th bit of value j (as a
# little-endian uint32, so byte j // 8, bit j % 8); 16 bytes qs whose low nibbles are values 0..15 and
# high nibbles values 16..31. x = d * (q - 16).
def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _fp16(blocks[:, :2])
    shifts = torch.arange(8, dtype=torch.uint8)
    qh = ((blocks[:, 2:6].unsqueeze(-1) >> shifts) & 1).reshape(n, 32)
    ql = _nibbles(blocks[:, 6:22]).reshape(n, 32)
    q = (ql | (qh << 4)).to(torch.float32).sub_(16)
    return d * q


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12 scale bytes of a Q4_K block into 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; scales/mins 4-7 keep their
    low 4 bits in the low/high nibble of bytes 8-11 and their top 2 bits in the top of bytes 0-3 / 4-7.
    """
    sc_lo, mn_lo, rest = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((sc_lo & 0x3F, (rest & 0x0F) | ((sc_lo >> 2) & 0x30)), dim=-1)
    mn = torch.cat((mn_lo & 0x3F, (rest >> 4) | ((mn_lo >> 2) & 0x30)), dim=-1)
    return sc, mn


# Q4_K, 144 bytes per 256 values in 8 sub-blocks of 32: fp16 d, fp16 dmin, 12 bytes of packed 6-bit
# sub-block scales and mins, then 128 bytes qs in 4 groups of 32 bytes; group g holds sub-block 2g in
# its low nibbles and 2g+1 in its high nibbles. x = (d * scale) * q - (dmin * min).
def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _fp16(blocks[:, 0:2])
    dmin = _fp16(blocks[:, 2:4])
    sc, mn = _q4_k_scales(blocks[:, 4:16])
    scale = (d * sc.to(torch.float32)).unsqueeze(-1)
    offset = (dmin * mn.to(torch.float32)).unsqueeze(-1)
    q = _nibbles(blocks[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).to(torch.float32)
    return (scale * q).sub_(offset).reshape(n, 256)


# Q6_K, 210 bytes per 256 values in 16 sub-blocks of 16: 128 bytes ql (low 4 bits), 64 bytes qh (top 2
# bits), 16 int8 sub-block scales, fp16 d. Each half of 128 values uses 64 ql bytes (low nibbles are
# values 0..63, high nibbles 64..127) and 32 qh bytes (bits 2s..2s+1 of byte l belong to value 32s + l).
# x = (d * scale) * (q - 32).
def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, 0:128].reshape(n, 2, 64)).reshape(n, 2, 128)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).unsqueeze(-1)
    qh = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 2, 128)
    q = (ql | (qh << 4)).reshape(n, 16, 16).to(torch.float32).sub_(32)
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    d = _fp16(blocks[:, 208:210])
    return ((d * scales).unsqueeze(-1) * q).reshape(n, 256)


# Plain float types are "blocks" of one value, which lets them share the size check and the chunking.
def _dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)  # may alias the read-only mmap; dequantize() copies it


def _dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).to(torch.float32)


def _dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).to(torch.float32)  # exact: bf16 is the top half of f32


_DEQUANT: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    _T.F32: _dequant_f32,
    _T.F16: _dequant_f16,
    _T.BF16: _dequant_bf16,
    _T.Q8_0: _dequant_q8_0,
    _T.Q5_0: _dequant_q5_0,
    _T.Q4_K: _dequant_q4_k,
    _T.Q6_K: _dequant_q6_k,
}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_DEQUANT)


def _type_name(qtype: GGMLQuantizationType | int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"#{int(qtype)}"


def quant_blocks(raw: numpy.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """The raw bytes of a quantized tensor as [blocks, bytes per block] uint8, after checking that its rows
    hold whole blocks and that the byte count matches the shape (a truncated file fails here)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row = shape[-1] if shape else 1
    if row % block_size:
        raise CorruptModelError(
            f"GGUF {qtype.name} tensor of shape {shape}: row length {row} "
            f"is not a multiple of the block size {block_size}"
        )
    n_blocks = math.prod(shape) // block_size
    if raw.nbytes != n_blocks * type_size:
        raise CorruptModelError(
            f"GGUF {qtype.name} tensor of shape {shape} should have {n_blocks * type_size} bytes of data, "
            f"found {raw.nbytes} (truncated or malformed file?)"
        )
    data = numpy.ascontiguousarray(raw).reshape(-1).view(numpy.uint8)
    with warnings.catch_warnings():
        # The GGUF mmap is read-only; we only ever read from this view.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data).view(n_blocks, type_size)


def dequantize(raw: numpy.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode one GGUF tensor's data into a new float32 tensor of `shape`.

    `raw` holds the tensor's bytes in file order: `GGUFTensor.data` (a flat uint8 view), or any
    C-contiguous array of them, e.g. as `gguf.GGUFReader` exposes it ((rows, bytes per row) uint8 for
    quantized types, typed values for F32/F16). It is only read. `shape` is the row-major torch
    shape (the reverse of the GGUF dims).
    """
    fn = _DEQUANT.get(qtype)
    if fn is None:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        name = _type_name(qtype)
        raise UnsupportedModelError(f"GGUF tensor type {name} is not supported (supported: {supported})")
    qtype = GGMLQuantizationType(qtype)
    shape = tuple(int(s) for s in shape)
    blocks = quant_blocks(raw, qtype, shape)
    n_blocks, block_size = blocks.shape[0], GGML_QUANT_SIZES[qtype][0]
    out = torch.empty((n_blocks, block_size), dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, n_blocks, step):
        out[start : start + step] = fn(blocks[start : start + step])
    return out.view(shape)
