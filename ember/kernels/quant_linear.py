"""Weight-only INT4 / INT8 linear layers for CPU inference.

Input representation (what the GGUF mapping and the calibration code produce), W [N out, K in]:
  int4 asymmetric: codes uint8 0..15 [N, K], scales/offsets float32 [N, K//g]; W = codes * scale + offset
  int8 symmetric:  codes int8 -128..127 [N, K], scales float32 [N, K//g];      W = codes * scale
with g in {16, 32, 64, 128} or g = K (per output channel).

Packed layout (what `pack_int4` / `pack_int8` return; layout-independent of whether the kernel exists,
so the PyTorch fallback and checkpoints use the same tensors):
  * rows are padded to a multiple of 64 and cut into tiles of 16 rows; within a tile the weights are
    interleaved "16 rows x 4 consecutive k" per 64-byte vector, so one AVX-512 VNNI `vpdpbusd` multiplies
    16 output rows by 4 activations at once (each int32 lane is one output row; no horizontal sums).
  * int4: qweight uint8 [Np/16, K/8, 64]; byte 4r+j holds row r's k=8i+j (low nibble) and k=8i+4+j
    (high nibble), so one load + and/shift yields the two 64-byte vectors for k-steps 8i and 8i+4.
  * int8: qweight int8 [Np/16, K/4, 64]; byte 4r+j is row r's k=4i+j.
  * scales (and int4 offsets) [Np/16, K/gk, 16], one load per tile per group, stored as
      - int8 multipliers + float32 factors scale_d/offset_d [Np/16, K/256, 16] when every value is
        exactly d * integer per 256-column super-block (GGUF Q4_K d*sc, dmin*m; Q6_K d*sc; detected and
        verified at pack time, so still exact);
      - else float16 when every value is exactly a float16 (GGUF Q8_0/Q5_0/Q4_0: d is float16);
      - else float32 (arbitrary calibrated scales). float16 can be forced: relative rounding <= 2^-11.
  * gk, the kernel group, is g for g <= 128; larger groups (per-channel) are split into gk = the largest
    of 128/64/32/16 dividing g, with the scale repeated, so int32 accumulators never overflow.
  Bytes per weight (g=32 unless said): int4 0.75 fp32 / 0.625 fp16 / 0.594 Q4_K-factored, 0.5625 g=128 fp32;
  int8 1.125 fp32 / 1.0625 fp16 (Q8_0, Q5_0) / 1.078 Q6_K-factored (g=16; 1.25 as fp32).
  (Gemma 3 270M's hidden size 640 is not a multiple of 256, so GGUF files fall back to Q5_0/Q8_0 there.)

Kernel (quant_linear.cpp, AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw` + `vpmaddwd` on CPUs without AVX-512):
activations are quantized per row and per group, and each group's dot product is exact int32 (on both paths,
so they agree), scaled once per group in fp32.
  * precise=True (default): x ~= xs * (256 hi + lo), two int8 parts, ~16 bits per group: y matches
    x @ unpack(W).T to ~1e-5 relative (tested bound), which the quantized layers' tests rely on.
  * precise=False: int8 activations (hi only), llama.cpp-style, ~0.5% relative error, half the dot work.

Routing and crossovers (bench/bench_quant_kernels.py, the AVX-512 path; CPU shared with other jobs during
development, so numbers are per-core CPU time, best of repeats, Gemma 3 270M shapes, int4/int8 g=32):
  * M <= 4: memory-bound, 28-35 GB/s of packed bytes per core; precise costs little. LM head
    262144x640 int4 g32 fp32 scales (126 MB): 3.9-4.5 ms on one core (bf16 F.linear 20 ms, torch
    int4pack g128 6.2 ms, int8pack 10 ms); 2 threads are bounded by ~48 GB/s, i.e. ~2.6 ms. With RTN's
    float16-valued parameters (fp16 storage, 105 MB): 2.1 ms on 2 threads (50 GB/s), quiet machine.
  * M = 8..64: the kernel stays the fastest path with int8 activations (LM head M=64: 50 ms int4,
    62 ms int8 vs bf16 F.linear 69 ms, torch int4pack 147 ms per core). precise costs 1.5x (M=8) to
    1.5-1.8x (M=64): LM head M=64 precise int4 76 ms, int8 110 ms, so batched decode should pass
    precise=False.
  * M = 512 (prefill): int8 activations beat oneDNN bf16 F.linear (gate_up 4.0 vs 5.3 ms, down 2.3 vs
    2.6 ms per core) and dequantize-whole-weight-then-F.linear (9.8 ms, mostly the dequantization);
    precise is 1.5-2.3x bf16 there. There is no crossover to a dequantize route on these shapes, so every
    CPU batch size goes to the kernel; the PyTorch route is only the fallback (neither AVX-512 VNNI nor AVX2, no
    compiler, non-CPU tensors, EMBER_DISABLE_KERNELS=1): exact in float32, slow.
  * Threads: at::parallel_for over 64-row blocks, one thread below MIN_TASK_BYTES (256 KB) of weights per
    task; cold 640x1536 int4 (0.74 MB) takes ~20 us on 2 threads vs ~35 us on one.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from ember.kernels.build import load_kernel

TILE_ROWS = 16  # output rows per 64-byte vector (one int32 lane each)
ROW_PAD = 64  # rows are padded to this so the kernel always runs whole groups of 4 tiles
MAX_KERNEL_GROUP = 128
MIN_TASK_BYTES = 1 << 18  # weight bytes per thread below which the kernel stays on one thread


def _kernel_group(group_size: int) -> int:
    if group_size <= MAX_KERNEL_GROUP:
        return group_size
    for gk in (128, 64, 32, 16):
        if group_size % gk == 0:
            return gk
    raise ValueError(f"group size {group_size} must be a multiple of 16")


def _check(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[int, int, int]:
    if codes.dim() != 2:
        raise ValueError("codes must be [N, K]")
    n, k = codes.shape
    if group_size <= 0 or k % group_size or group_size % 16:
        raise ValueError(f"group size {group_size} must divide K={k} and be a multiple of 16")
    if tuple(scales.shape) != (n, k // group_size):
        raise ValueError(f"scales must be [{n}, {k // group_size}], got {tuple(scales.shape)}")
    return n, k, _kernel_group(group_size)


def _scale_dtype(requested: torch.dtype | None, *values: torch.Tensor) -> torch.dtype:
    """None: float16 when every value is exactly a float16 (GGUF Q8_0/Q5_0/Q4_0 scales are), else float32."""
    if requested is not None:
        return requested
    for v in values:
        v = v.to(torch.float32)
        if not torch.equal(v.to(torch.float16).to(torch.float32), v):
            return torch.float32
    return torch.float16


SUPER_BLOCK = 256  # columns per GGUF K-quant super-block (one float16 d, per-group 6/8-bit multipliers)
# Candidate multipliers of a super-block's largest |value|: Q4_K scales/mins are 6-bit (max 63); Q6_K maps
# its largest scale to -128 (with either sign of d).
_SUPER_MAX = (63, -128, 128, 127, -127, -63)


def _factor_super_blocks(values: list[torch.Tensor], group: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each [N, G] tensor as int8 multipliers [N, G] times float32 factors [N, G/S] per 256-column super-block,
    if that is exact for every value (GGUF Q4_K / Q6_K scales d*sc and mins dmin*m are), else None.
    Candidate factors are max|v| / _SUPER_MAX; exactness is checked, never assumed."""
    if group > 32 or values[0].shape[1] * group % SUPER_BLOCK:
        return None
    per = SUPER_BLOCK // group
    out = []
    for v in values:
        v = v.to(torch.float32).reshape(v.shape[0], -1, per)
        amax = v.abs().amax(-1, keepdim=True)
        mult = torch.zeros_like(v)
        d = torch.zeros_like(amax)
        done = amax == 0
        for top in _SUPER_MAX:
            cand = amax / top
            q = torch.where(cand != 0, torch.round(v / cand), 0.0)
            ok = ((q >= -128) & (q <= 127) & (q * cand == v)).all(-1, keepdim=True) & ~done
            mult = torch.where(ok, q, mult)
            d = torch.where(ok, cand, d)
            done |= ok
        if not bool(done.all()):
            return None
        out.append((mult.to(torch.int8).flatten(1), d.flatten(1)))
    return out


def _tile_groups(t: torch.Tensor, n_pad: int, repeat: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, G] per-row group values -> dtype [Np/16, G*repeat, 16] (zero for padded rows)."""
    if dtype not in (torch.float32, torch.float16, torch.int8):
        raise ValueError(f"scale dtype must be float32 or float16, not {dtype}")
    t = t.to(torch.float32).repeat_interleave(repeat, dim=1)
    t = F.pad(t, (0, 0, 0, n_pad - t.shape[0])).to(dtype)
    if not torch.isfinite(t).all():
        raise ValueError(f"scales/offsets do not fit in {dtype}")
    return t.view(n_pad // TILE_ROWS, TILE_ROWS, -1).transpose(1, 2).contiguous()


def _group_values(t: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    """Packed scales/offsets [Np/16, G, 16] (any storage) -> float32 values, exactly as the kernel uses them."""
    t = t.to(torch.float32)
    return t if d is None else t * d.repeat_interleave(t.shape[1] // d.shape[1], dim=1)


def _untile_groups(t: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """float32 [Np/16, G, 16] -> [N, K] with each group value repeated over its columns."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n].repeat_interleave(group, dim=1)


def _padded_rows(n: int) -> int:
    return -(-n // ROW_PAD) * ROW_PAD


@dataclass
class PackedInt4:
    """int4 asymmetric weight in the kernel layout (see the module docstring)."""

    qweight: torch.Tensor  # uint8 [Np/16, K/8, 64]
    scales: torch.Tensor  # float32 or float16 [Np/16, K/gk, 16], or int8 multipliers of scale_d
    offsets: torch.Tensor  # like scales
    out_features: int  # N (rows beyond it are padding)
    scale_d: torch.Tensor | None = None  # float32 [Np/16, K/256, 16] when scales are int8 super-block multipliers
    offset_d: torch.Tensor | None = None  # likewise for offsets

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8

    @property
    def group_size(self) -> int:
        """The kernel group gk (the input group, or a divisor of it for groups above 128)."""
        return self.in_features // self.scales.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"qweight": self.qweight, "scales": self.scales, "offsets": self.offsets}
        if self.scale_d is not None:
            t |= {"scale_d": self.scale_d, "offset_d": self.offset_d}
        return t

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], out_features: int) -> PackedInt4:
        return cls(
            tensors["qweight"], tensors["scales"], tensors["offsets"], out_features,
            tensors.get("scale_d"), tensors.get("offset_d"),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class PackedInt8:
    """int8 symmetric weight in the kernel layout (see the module docstring)."""

    qweight: torch.Tensor  # int8 [Np/16, K/4, 64]
    scales: torch.Tensor  # float32 or float16 [Np/16, K/gk, 16], or int8 multipliers of scale_d
    out_features: int
    scale_d: torch.Tensor | None = None  # float32 [Np/16, K/256, 16] when scales are int8

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 4

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"qweight": self.qweight, "scales": self.scales}
        return t if self.scale_d is None else t | {"scale_d": self.scale_d}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], out_features: int) -> PackedInt8:
        return cls(tensors["qweight"], tensors["scales"], out_features, tensors.get("scale_d"))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


Packed = PackedInt4 | PackedInt8


def pack_int4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    scale_dtype: torch.dtype | None = None,
) -> PackedInt4:
    """codes uint8 0..15 [N, K], scales/offsets [N, K//group_size] -> PackedInt4 (W = codes*scale + offset).
    scale_dtype: None (default) stores float16 when that is lossless, else float32 (exact: Q4_K's d*sc and
    Q6_K's d*sc need it); float16 forced saves 4/g bytes per weight at a relative rounding <= 2^-11."""
    n, k, gk = _check(codes, scales, group_size)
    if tuple(offsets.shape) != tuple(scales.shape):
        raise ValueError("offsets must have the shape of scales")
    n_pad = _padded_rows(n)
    c = F.pad(codes.to(torch.uint8), (0, 0, 0, n_pad - n))
    # [T, 16 rows, K/8, 2 halves, 4 k] -> [T, K/8, 16, 2, 4]; low half -> low nibble.
    c = c.view(n_pad // TILE_ROWS, TILE_ROWS, k // 8, 2, 4).permute(0, 2, 1, 3, 4)
    q = (c[..., 0, :] & 0xF) | ((c[..., 1, :] & 0xF) << 4)
    q = q.reshape(n_pad // TILE_ROWS, k // 8, 64).contiguous()
    factored = _factor_super_blocks([scales, offsets], group_size) if scale_dtype is None else None
    if factored:
        (sm, sd), (om, od) = factored
        return PackedInt4(
            q, _tile_groups(sm, n_pad, 1, torch.int8), _tile_groups(om, n_pad, 1, torch.int8), n,
            _tile_groups(sd, n_pad, 1, torch.float32), _tile_groups(od, n_pad, 1, torch.float32),
        )
    rep = group_size // gk
    scale_dtype = _scale_dtype(scale_dtype, scales, offsets)
    return PackedInt4(q, _tile_groups(scales, n_pad, rep, scale_dtype), _tile_groups(offsets, n_pad, rep, scale_dtype), n)


def pack_int8(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int, scale_dtype: torch.dtype | None = None
) -> PackedInt8:
    """codes int8 [N, K], scales [N, K//group_size] -> PackedInt8 (W = codes * scale); scale_dtype as in
    pack_int4."""
    n, k, gk = _check(codes, scales, group_size)
    n_pad = _padded_rows(n)
    c = F.pad(codes.to(torch.int8), (0, 0, 0, n_pad - n))
    q = c.view(n_pad // TILE_ROWS, TILE_ROWS, k // 4, 4).permute(0, 2, 1, 3)
    q = q.reshape(n_pad // TILE_ROWS, k // 4, 64).contiguous()
    factored = _factor_super_blocks([scales], group_size) if scale_dtype is None else None
    if factored:
        ((sm, sd),) = factored
        return PackedInt8(q, _tile_groups(sm, n_pad, 1, torch.int8), n, _tile_groups(sd, n_pad, 1, torch.float32))
    scale_dtype = _scale_dtype(scale_dtype, scales)
    return PackedInt8(q, _tile_groups(scales, n_pad, group_size // gk, scale_dtype), n)


def _codes(packed: Packed, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes [N or len(rows), K] as float32, undoing the tile interleave."""
    q = packed.qweight
    k = packed.in_features
    if isinstance(packed, PackedInt4):
        q = q.view(q.shape[0], k // 8, TILE_ROWS, 4)  # [T, K/8, 16, 4]
        q = torch.stack((q & 0xF, q >> 4), dim=3)  # [T, K/8, 16, 2, 4]
        q = q.permute(0, 2, 1, 3, 4).reshape(-1, k)
    else:
        q = q.view(q.shape[0], k // 4, TILE_ROWS, 4).permute(0, 2, 1, 3).reshape(-1, k)
    q = q[: packed.out_features] if rows is None else q[rows]
    return q.to(torch.float32)


def unpack(packed: Packed) -> torch.Tensor:
    """Exact dequantized weight, float32 [N, K]."""
    n, g = packed.out_features, packed.group_size
    w = _codes(packed) * _untile_groups(_group_values(packed.scales, packed.scale_d), n, g)
    if isinstance(packed, PackedInt4):
        w += _untile_groups(_group_values(packed.offsets, packed.offset_d), n, g)
    return w


def embedding_rows(packed: Packed, ids: torch.Tensor) -> torch.Tensor:
    """Dequantized rows W[ids] as float32 [len(ids), K] (quantized tied embeddings look rows up)."""
    ids = ids.reshape(-1).to(torch.long)
    g = packed.group_size
    tile, lane = ids // TILE_ROWS, ids % TILE_ROWS
    codes = _gather_codes(packed, tile, lane)
    w = codes * _row_values(packed.scales, packed.scale_d, tile, lane).repeat_interleave(g, dim=1)
    if isinstance(packed, PackedInt4):
        w += _row_values(packed.offsets, packed.offset_d, tile, lane).repeat_interleave(g, dim=1)
    return w


def _row_values(t: torch.Tensor, d: torch.Tensor | None, tile: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    """Group values [R, G] of rows (tile, lane), without converting the whole scale tensor."""
    v = t[tile, :, lane].to(torch.float32)
    return v if d is None else v * d[tile, :, lane].repeat_interleave(t.shape[1] // d.shape[1], dim=1)


def _gather_codes(packed: Packed, tile: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    """Codes of rows (tile, lane) without unpacking the whole matrix."""
    k = packed.in_features
    if isinstance(packed, PackedInt4):
        q = packed.qweight.view(packed.qweight.shape[0], k // 8, TILE_ROWS, 4)[tile, :, lane]  # [R, K/8, 4]
        q = torch.stack((q & 0xF, q >> 4), dim=2)  # [R, K/8, 2, 4]
    else:
        q = packed.qweight.view(packed.qweight.shape[0], k // 4, TILE_ROWS, 4)[tile, :, lane]  # [R, K/4, 4]
    return q.reshape(len(tile), k).to(torch.float32)


# AVX-512 VNNI (and BW, VL, which every VNNI CPU has), or AVX2 with FMA and F16C (x86-64-v3).
KERNEL_CPU_FLAGS = ("avx512_vnni avx512bw avx512vl", "avx2 fma f16c")


def quant_module() -> ModuleType | None:
    return load_kernel("quant_linear", KERNEL_CPU_FLAGS)


_KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def uses_kernel(x: torch.Tensor, packed: Packed) -> bool:
    return (
        x.is_cpu
        and packed.qweight.is_cpu
        and x.dtype in _KERNEL_DTYPES
        and x.numel() > 0
        and quant_module() is not None
    )


def quant_linear_reference(
    x: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Pure PyTorch: dequantize to float32 and F.linear in float32. Correct everywhere, slow."""
    w = unpack(packed).to(x.device)
    y = F.linear(x.to(torch.float32), w, None if bias is None else bias.to(torch.float32))
    return y.to(out_dtype or x.dtype)


def quant_linear_dequant(
    x: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Dequantize the whole weight to x.dtype, then F.linear (oneDNN GEMM): the large-batch route."""
    w = unpack(packed).to(x.dtype)
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return y if out_dtype is None else y.to(out_dtype)


def quant_linear(
    x: torch.Tensor,
    packed: Packed,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    precise: bool = True,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [..., K] bf16/fp32; y [..., N] in out_dtype (default x.dtype).
    out_dtype=float32 keeps the kernel's fp32 accumulators (logits). precise=True (default): two-part,
    ~16-bit activations, so y matches x @ unpack(W).T to ~1e-5 relative; free while memory-bound (<= 4
    rows), 1.5-1.9x the compute from 8 rows on. precise=False: int8 activations (llama.cpp-style, ~0.5%
    relative error), the faster choice for batched decode and prefill."""
    # This runs ~70 times per decoded token: keep the Python path short (it costs more than a small GEMV).
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {packed.in_features}")
    if not uses_kernel(x, packed):
        return quant_linear_reference(x, packed, bias, out_dtype)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out_fp32 = out_dtype == torch.float32 or (out_dtype is None and x.dtype == torch.float32)
    if type(packed) is PackedInt4:
        y = quant_module().int4_linear(
            x2, packed.qweight, packed.scales, packed.offsets, packed.scale_d, packed.offset_d, bias,
            packed.out_features, out_fp32, precise, MIN_TASK_BYTES,
        )
    else:
        y = quant_module().int8_linear(
            x2, packed.qweight, packed.scales, packed.scale_d, bias, packed.out_features, out_fp32, precise,
            MIN_TASK_BYTES,
        )
    if x2 is not x:
        y = y.view(*x.shape[:-1], packed.out_features)
    return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)
