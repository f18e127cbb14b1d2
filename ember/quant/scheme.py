"""Weight quantization schemes and the quantized-weight representation every producer shares.

A weight W [N, K] is cut into groups of `g` consecutive input columns per output row; each group has
its own scale (and, for asymmetric schemes, an offset), held as fp32 here. RTN (and so GPTQ, which
takes its group parameters from RTN) makes them float16 values, so the kernel stores 2 bytes each
without loss; GGUF K-quant parameters need fp32 (or their own factored form):

* int4 (asymmetric): codes uint8 in 0..15, W ~= codes * scale + offset
* int8 (symmetric):  codes int8 in -128..127, W ~= codes * scale

This is the format of `ember.kernels.quant_linear` (pack_int4 / pack_int8). RTN quantize-on-load, the
GGUF converters (ember.loader.gguf_native) and the calibration methods (GPTQ/AWQ) all produce a
`QuantizedWeight`, so the layers, the kernels and the checkpoint format see one representation.

Scheme strings (CLI `--quantization`, `LLM(quantization=...)`):

* ``int8``        int8 symmetric, per output channel (g = K). Per-channel absmax loses almost nothing at
                  8 bits, and one scale per row is the cheapest to apply.
* ``int4``        int4 asymmetric, groups of 32. At 4 bits per-channel RTN visibly hurts small models;
                  32 matches GGUF's Q4_K / Q4_0 blocks and RTN quality, at 1 fp16 scale + offset per 32
                  weights (1 extra bit per weight; g128 quarters that at some accuracy cost).
* ``int4-g128``, ``int8-g32``, ...  explicit group size (16, 32, 64, 128)
* ``int4-pc`` / ``int8-pc``         explicit per channel
* ``int4-sym``    int4 with a symmetric grid (codes - 8) * scale, stored as offset = -8 * scale
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ember.errors import InvalidRequestError

GROUP_SIZES = (16, 32, 64, 128)
PER_CHANNEL = -1
_DEFAULT_GROUP = {4: 32, 8: PER_CHANNEL}
_SCHEME_RE = re.compile(r"^int(?P<bits>4|8)(?P<opts>(-[a-z0-9]+)*)$")


@dataclass(frozen=True)
class QuantScheme:
    """bits: 4 or 8; group_size: 16/32/64/128 or -1 (one group per output row); symmetric: int8 must be."""

    bits: int
    group_size: int = 32
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise InvalidRequestError(f"quantization: {self.bits}-bit weights are not supported (use 4 or 8)")
        if self.group_size != PER_CHANNEL and self.group_size not in GROUP_SIZES:
            raise InvalidRequestError(
                f"quantization: group size {self.group_size} is not supported "
                f"(use one of {', '.join(map(str, GROUP_SIZES))} or per channel)"
            )
        if self.bits == 8 and not self.symmetric:
            # The int8 kernel has no offsets: an asymmetric int8 grid would need a second weight pass.
            raise InvalidRequestError("quantization: int8 is symmetric only")

    @classmethod
    def parse(cls, text: str) -> QuantScheme:
        """'int8', 'int4', 'int4-g128', 'int8-g32', 'int4-pc', 'int4-sym', 'int4-g64-sym' -> QuantScheme."""
        match = _SCHEME_RE.match(text.strip().lower())
        if match is None:
            raise InvalidRequestError(
                f"quantization scheme {text!r} is not understood (examples: int8, int4, int4-g128, int8-g32, int4-pc)"
            )
        bits = int(match["bits"])
        group = _DEFAULT_GROUP[bits]
        symmetric = bits == 8
        for opt in filter(None, match["opts"].split("-")):
            if opt == "pc":
                group = PER_CHANNEL
            elif opt == "sym":
                symmetric = True
            elif opt.startswith("g") and opt[1:].isdigit():
                group = int(opt[1:])
            else:
                raise InvalidRequestError(f"quantization scheme {text!r}: unknown option {opt!r}")
        return cls(bits, group, symmetric)

    @property
    def name(self) -> str:
        """Canonical string; `QuantScheme.parse(s.name) == s`."""
        group = "pc" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        sym = "-sym" if self.symmetric and self.bits == 4 else ""
        return f"int{self.bits}-{group}{sym}"

    def group_for(self, in_features: int) -> int:
        """The concrete group size for a weight with `in_features` columns."""
        g = in_features if self.group_size == PER_CHANNEL else self.group_size
        if in_features % g:
            raise InvalidRequestError(
                f"quantization {self.name}: {in_features} input features are not a multiple of group size {g}"
            )
        return g

    def __str__(self) -> str:
        return self.name


@dataclass
class QuantizedWeight:
    """codes [N, K] (uint8 0..15 for int4, int8 for int8), scales fp32 [N, K // g], offsets fp32 [N, K // g]
    for int4 (None for int8). `scheme.group_size` may be -1; the real group size is K // scales.shape[1]."""

    scheme: QuantScheme
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        if self.scales.dim() != 2 or self.scales.shape[0] != n or k % self.scales.shape[1]:
            raise ValueError(f"scales {tuple(self.scales.shape)} do not fit codes {tuple(self.codes.shape)}")
        if self.scheme.bits == 4:
            if self.codes.dtype != torch.uint8 or self.offsets is None:
                raise ValueError("int4 weights need uint8 codes and offsets")
            if self.offsets.shape != self.scales.shape:
                raise ValueError("int4 offsets must have the shape of the scales")
        elif self.codes.dtype != torch.int8 or self.offsets is not None:
            raise ValueError("int8 weights need int8 codes and no offsets")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]."""
        n, k = self.codes.shape
        g = self.group_size
        grouped = self.codes.to(torch.float32).view(n, k // g, g)
        w = grouped * self.scales.unsqueeze(-1)
        if self.offsets is not None:
            w = w + self.offsets.unsqueeze(-1)
        return w.view(n, k)

    def max_error(self) -> torch.Tensor:
        """Per-element bound on |dequantize() - W| for an RTN-quantized W: half a step, [N, K // g]."""
        return self.scales.abs() / 2


def quantize_rtn(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round-to-nearest: per group, int4 maps [min, max] onto 0..15 (asymmetric), int8 maps
    [-absmax, absmax] onto -127..127 (symmetric; -128 unused so the grid is symmetric).

    Rows are quantized in chunks so a large table (a 262k-row embedding) needs only a few MB of
    float32 intermediates beyond its codes."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_rtn expects a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    g = scheme.group_for(k)
    codes = torch.empty((n, k), dtype=torch.int8 if scheme.bits == 8 else torch.uint8)
    scales = torch.empty((n, k // g), dtype=torch.float32)
    offsets = torch.empty_like(scales) if scheme.bits == 4 else None
    step = max(1, _RTN_CHUNK_ELEMENTS // k)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        c, s, o = _rtn_rows(weight[rows].detach().to(torch.float32), scheme, g)
        codes[rows], scales[rows] = c, s
        if offsets is not None:
            offsets[rows] = o
    return QuantizedWeight(scheme, codes, scales, offsets)


_RTN_CHUNK_ELEMENTS = 1 << 22


def _rtn_rows(
    weight: torch.Tensor, scheme: QuantScheme, g: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group parameters are made float16 values (scales rounded up, offsets down, so the grid still spans each
    group and the error stays within half a step) before the codes are chosen against them: the kernel then
    stores 2-byte instead of 4-byte parameters losslessly (int4-g32: 0.625 instead of 0.75 bytes per weight)."""
    n, k = weight.shape
    w = weight.reshape(n, k // g, g)
    if scheme.bits == 8 or scheme.symmetric:
        qmax = 127 if scheme.bits == 8 else 7
        scales = _float16_toward(w.abs().amax(dim=-1) / qmax, up=True)
        # An all-zero group gets scale 1 (any scale represents it exactly) so no division by zero.
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(w / scales.unsqueeze(-1))
        if scheme.bits == 8:
            return q.clamp_(-127, 127).to(torch.int8).view(n, k), scales, None
        return (q.clamp_(-8, 7) + 8).to(torch.uint8).view(n, k), scales, -8 * scales
    lo = _float16_toward(w.amin(dim=-1), up=False)
    scales = _float16_toward((w.amax(dim=-1) - lo) / 15, up=True)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((w - lo.unsqueeze(-1)) / scales.unsqueeze(-1))
    return q.clamp_(0, 15).to(torch.uint8).view(n, k), scales, lo


def _float16_toward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The nearest float16 value >= x (up) or <= x (down), as float32; x itself where float16 cannot hold it
    (beyond +-65504: the packer then keeps float32)."""
    half = x.to(torch.float16)
    rounded = half.to(torch.float32)
    wrong = rounded < x if up else rounded > x
    if bool(wrong.any()):
        # One float16 step toward the target: on the bit pattern, +1 moves away from zero, -1 toward it.
        bits = half.view(torch.int16).to(torch.int32)
        away = (rounded > 0) == up  # e.g. rounding up a positive value moves away from zero
        stepped = torch.where(away, bits + 1, bits - 1)
        # A zero has no "toward zero" step: the first subnormal of the needed sign instead.
        stepped = torch.where(rounded == 0, torch.full_like(bits, 1 if up else -32767), stepped)
        fixed = stepped.to(torch.int16).view(torch.float16).to(torch.float32)
        rounded = torch.where(wrong, fixed, rounded)
    return torch.where(torch.isfinite(rounded), rounded, x)
