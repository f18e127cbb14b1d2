"""GGUF quantized tensors -> ember `QuantizedWeight`s, exactly and without a float round trip.

Each supported GGUF block type is an affine grid per small group of one row, so it maps onto one of
ember's two formats with no loss:

* Q4_K -> int4 g32 (asymmetric): per 32-value sub-block, scale = d * sc, offset = -(dmin * m), codes q
* Q8_0 -> int8 g32: scale d, codes q
* Q5_0 -> int8 g32: scale d, codes q - 16 (-16..15; 5-bit values need the int8 format)
* Q6_K -> int8 g16: per 16-value sub-block, scale = d * sc, codes q - 32 (-32..31)

The scales are products of an fp16 and a small integer, so they are exact in fp32, and
codes * scale (+ offset) reproduces `gguf_quants.dequantize` bit for bit (tests check this).
F32/F16/BF16 tensors are not quantized: `to_quantized_weight` returns None for them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ember.errors import CorruptModelError, UnsupportedModelError
from ember.loader.gguf_quants import _fp16, _nibbles, _q4_k_scales, quant_blocks
from ember.quant.scheme import QuantizedWeight, QuantScheme

_T = GGMLQuantizationType
FLOAT_TYPES = (_T.F32, _T.F16, _T.BF16)

# Converted this many blocks at a time, to bound the int16/float intermediates (as gguf_quants does).
_CHUNK_ELEMENTS = 1 << 20

Converted = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # codes, scales, offsets per block


def _q8_0(blocks: torch.Tensor) -> Converted:
    return blocks[:, 2:].view(torch.int8), _fp16(blocks[:, :2]), None


def _q5_0(blocks: torch.Tensor) -> Converted:
    n = blocks.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8)
    qh = ((blocks[:, 2:6].unsqueeze(-1) >> shifts) & 1).reshape(n, 32)
    ql = _nibbles(blocks[:, 6:22]).reshape(n, 32)
    codes = (ql | (qh << 4)).view(torch.int8) - 16  # 0..31 fits int8; shift to the signed grid
    return codes, _fp16(blocks[:, :2]), None


def _q4_k(blocks: torch.Tensor) -> Converted:
    n = blocks.shape[0]
    d = _fp16(blocks[:, 0:2])
    dmin = _fp16(blocks[:, 2:4])
    sc, mn = _q4_k_scales(blocks[:, 4:16])
    scales = d * sc.to(torch.float32)
    offsets = -(dmin * mn.to(torch.float32))  # ggml subtracts dmin * m; adding its negation is the same float op
    codes = _nibbles(blocks[:, 16:144].reshape(n, 4, 32)).reshape(n, 256)
    return codes, scales, offsets


def _q6_k(blocks: torch.Tensor) -> Converted:
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, 0:128].reshape(n, 2, 64)).reshape(n, 2, 128)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).unsqueeze(-1)
    qh = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 2, 128)
    codes = (ql | (qh << 4)).reshape(n, 256).view(torch.int8) - 32
    scales = _fp16(blocks[:, 208:210]) * blocks[:, 192:208].view(torch.int8).to(torch.float32)
    return codes, scales, None


# type -> (converter, ember scheme); the scheme's group size is the GGUF (sub-)block size.
_CONVERTERS: dict[GGMLQuantizationType, tuple[Callable[[torch.Tensor], Converted], QuantScheme]] = {
    _T.Q4_K: (_q4_k, QuantScheme(bits=4, group_size=32, symmetric=False)),
    _T.Q8_0: (_q8_0, QuantScheme(bits=8, group_size=32, symmetric=True)),
    _T.Q5_0: (_q5_0, QuantScheme(bits=8, group_size=32, symmetric=True)),
    _T.Q6_K: (_q6_k, QuantScheme(bits=8, group_size=16, symmetric=True)),
}

NATIVE_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_CONVERTERS)


def scheme_for(qtype: GGMLQuantizationType) -> QuantScheme | None:
    """The ember scheme a GGUF type is kept in (None for float types)."""
    if qtype in FLOAT_TYPES:
        return None
    if qtype not in _CONVERTERS:
        raise UnsupportedModelError(_unsupported(qtype))
    return _CONVERTERS[qtype][1]


def to_quantized_weight(raw: numpy.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> QuantizedWeight | None:
    """Convert one 2-D GGUF tensor's bytes (file order) into a QuantizedWeight of `shape` [N, K];
    None for float types (the caller dequantizes those)."""
    if qtype in FLOAT_TYPES:
        return None
    if qtype not in _CONVERTERS:
        raise UnsupportedModelError(_unsupported(qtype))
    qtype = GGMLQuantizationType(qtype)
    convert, scheme = _CONVERTERS[qtype]
    block_size = GGML_QUANT_SIZES[qtype][0]
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise CorruptModelError(f"GGUF {qtype.name} tensor of shape {shape}: only 2-D weights can stay quantized")
    rows, cols = shape
    blocks = quant_blocks(raw, qtype, shape)
    n_blocks = blocks.shape[0]
    g = scheme.group_size
    groups_per_block = block_size // g
    codes = torch.empty((n_blocks, block_size), dtype=torch.uint8 if scheme.bits == 4 else torch.int8)
    scales = torch.empty((n_blocks, groups_per_block), dtype=torch.float32)
    offsets = torch.empty_like(scales) if scheme.bits == 4 else None
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, n_blocks, step):
        c, s, o = convert(blocks[start : start + step])
        codes[start : start + step] = c
        scales[start : start + step] = s
        if offsets is not None:
            offsets[start : start + step] = o
    return QuantizedWeight(
        scheme,
        codes.view(rows, cols),
        scales.view(rows, cols // g),
        None if offsets is None else offsets.view(rows, cols // g),
    )


def _unsupported(qtype: GGMLQuantizationType | int) -> str:
    try:
        name = GGMLQuantizationType(qtype).name
    except ValueError:
        name = f"#{int(qtype)}"
    kept = ", ".join(t.name for t in (*FLOAT_TYPES, *NATIVE_TYPES))
    return f"GGUF tensor type {name} is not supported (supported: {kept})"
