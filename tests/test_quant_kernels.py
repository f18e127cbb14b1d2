"""Weight-only int4/int8 matmul: packing is lossless, the kernel and the fallback match x @ W.T."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ember.kernels import build
from ember.kernels import quant_linear as ql

needs_kernel = pytest.mark.skipif(
    ql.quant_module() is None, reason="no AVX-512 VNNI or AVX2 CPU, or no compiler here"
)

GROUPS = [16, 32, 64, 128, None]  # None: per output channel (g = K)


def make_weight(kind: str, n: int, k: int, group: int | None, seed: int = 0, scale_dtype=torch.float32):
    """Random codes and scales -> (packed, exact float64 dequantized weight)."""
    g = group or k
    gen = torch.Generator().manual_seed(seed)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 1e-3).to(scale_dtype).float()
    if kind == "int4":
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
        offsets = (-scales * torch.randint(0, 16, (n, k // g), generator=gen)).to(scale_dtype).float()
        w = codes.float() * scales.repeat_interleave(g, 1) + offsets.repeat_interleave(g, 1)  # fp32, as unpack
        return ql.pack_int4(codes, scales, offsets, g, scale_dtype), w.double()
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    w = codes.float() * scales.repeat_interleave(g, 1)
    return ql.pack_int8(codes, scales, g, scale_dtype), w.double()


def error_bound(x: torch.Tensor, w: torch.Tensor, gk: int, precise: bool) -> torch.Tensor:
    """Per-output bound for the kernel: activation quantization error (|e_k| <= group absmax / 32512 in
    precise mode, / 254 with int8 activations) weighted by |W|, plus fp32 summation error ~ K eps."""
    m, k = x.shape
    amax = x.double().abs().view(m, k // gk, gk).amax(-1).repeat_interleave(gk, 1)
    quant = amax @ w.abs().T / (32512 if precise else 254)
    return quant + 4 * k * 2.0**-24 * (x.double().abs() @ w.abs().T) + 1e-6


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("group", GROUPS)
def test_pack_unpack_round_trip_is_exact(kind, group):
    packed, w = make_weight(kind, 77, 256, group)
    assert packed.out_features == 77 and packed.in_features == 256
    assert torch.equal(ql.unpack(packed).double(), w)
    ids = torch.tensor([0, 76, 15, 16, 63, 64, 5])
    assert torch.equal(ql.embedding_rows(packed, ids).double(), w[ids])
    cls = type(packed)
    again = cls.from_tensors(packed.tensors(), packed.out_features)
    assert torch.equal(ql.unpack(again), ql.unpack(packed))


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_float16_scales_round_within_bound(kind):
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (40, 64), dtype=torch.uint8, generator=gen)
    scales = torch.rand(40, 2, generator=gen) * 0.05 + 1e-3
    offsets = -scales * 7.3
    if kind == "int4":
        exact = ql.unpack(ql.pack_int4(codes, scales, offsets, 32)).double()
        half = ql.unpack(ql.pack_int4(codes, scales, offsets, 32, torch.float16)).double()
        bound = (15 * scales.abs() + offsets.abs()).double().repeat_interleave(32, 1) * 2.0**-11
    else:
        codes8 = codes.to(torch.int8) - 8
        exact = ql.unpack(ql.pack_int8(codes8, scales, 32)).double()
        half = ql.unpack(ql.pack_int8(codes8, scales, 32, torch.float16)).double()
        bound = 8 * scales.double().repeat_interleave(32, 1) * 2.0**-11
    assert ((half - exact).abs() <= bound + 1e-7).all()
    with pytest.raises(ValueError):
        ql.pack_int8(codes.to(torch.int8), scales * 1e8, 32, torch.float16)  # beyond float16


def test_scales_are_float16_only_when_lossless():
    codes = torch.randint(-128, 128, (16, 64), dtype=torch.int8)
    q8_0 = torch.rand(16, 2).half().float()  # GGUF Q8_0: float16 d
    assert ql.pack_int8(codes, q8_0, 32).scales.dtype == torch.float16
    q6_k = q8_0 * torch.randint(1, 64, (16, 2))  # d * sc: needs float32
    assert ql.pack_int8(codes, q6_k, 32).scales.dtype == torch.float32
    assert torch.equal(ql.unpack(ql.pack_int8(codes, q6_k, 32)), codes.float() * q6_k.repeat_interleave(32, 1))


def test_bytes_per_weight():
    p4, _ = make_weight("int4", 128, 256, 32)
    p8, _ = make_weight("int8", 128, 256, 32)
    assert p4.nbytes() / (128 * 256) == 0.75
    assert p8.nbytes() / (128 * 256) == 1.125
    p4h, _ = make_weight("int4", 128, 256, 32, scale_dtype=torch.float16)
    assert p4h.nbytes() / (128 * 256) == 0.625


@needs_kernel
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("rows", [1, 3, 8, 17, 64, 512])
def test_kernel_matches_dequantized_matmul(kind, group, rows):
    n, k = (77, 256) if rows < 512 else (45, 128)
    packed, w = make_weight(kind, n, k, group, seed=rows)
    gen = torch.Generator().manual_seed(rows + 1)
    x = torch.randn(rows, k, generator=gen)
    x[:, 3] *= 30  # an outlier channel, as real activations have
    bias = torch.randn(n, generator=gen) if rows % 2 else None
    ref = x.double() @ w.T + (0 if bias is None else bias.double())
    for precise in (True, False):
        y = ql.quant_linear(x, packed, bias, out_dtype=torch.float32, precise=precise)
        assert y.shape == (rows, n) and y.dtype == torch.float32
        assert ((y.double() - ref).abs() <= error_bound(x, w, packed.group_size, precise)).all()


@needs_kernel
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_kernel_bf16_input_and_output(kind, scale_dtype):
    packed, w = make_weight(kind, 130, 640, 32, scale_dtype=scale_dtype)
    x = torch.randn(2, 3, 640).bfloat16()
    y = ql.quant_linear(x, packed)
    assert y.shape == (2, 3, 130) and y.dtype == torch.bfloat16
    ref = x.double().reshape(6, 640) @ w.T
    bound = error_bound(x.reshape(6, 640).float(), w, 32, True) + ref.abs() * 2.0**-8  # bf16 output rounding
    assert ((y.reshape(6, 130).double() - ref).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_kernel_dots_are_exact_at_the_code_extremes(kind, sign):
    """The largest codes times the largest activations, where an AVX2 int16 pair sum would saturate if the
    operands were not arranged for it: with x = +-127 (quantized exactly) and power-of-two scales, y is exact."""
    n, k, g = 40, 256, 32
    scales = torch.full((n, k // g), 2.0**-6)
    if kind == "int4":
        packed = ql.pack_int4(torch.full((n, k), 15, dtype=torch.uint8), scales, torch.zeros_like(scales), g)
        w = 15 * 2.0**-6
    else:
        packed = ql.pack_int8(torch.full((n, k), -128, dtype=torch.int8), scales, g)
        w = -128 * 2.0**-6
    x = torch.full((3, k), 127.0 * sign)
    for precise in (True, False):
        y = ql.quant_linear(x, packed, out_dtype=torch.float32, precise=precise)
        assert torch.equal(y, torch.full((3, n), 127.0 * sign * w * k))


@needs_kernel
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_kernel_bf16_output_is_the_rounded_fp32_output(kind):
    """bf16 output is the fp32 accumulator rounded to nearest even, as torch rounds (also with AVX2's integer
    rounding); a row count not a multiple of 16 exercises the partial stores."""
    packed, _ = make_weight(kind, 77, 256, 32)
    x = torch.randn(5, 256) * 1e3
    bias = torch.randn(77)
    fp32 = ql.quant_linear(x, packed, bias, out_dtype=torch.float32)
    assert torch.equal(ql.quant_linear(x, packed, bias, out_dtype=torch.bfloat16), fp32.bfloat16())


@needs_kernel
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_fallback_matches_kernel(kind, rows, monkeypatch):
    packed, w = make_weight(kind, 100, 512, 64)
    x = torch.randn(rows, 512)
    bias = torch.randn(100)
    fast = ql.quant_linear(x, packed, bias, out_dtype=torch.float32)
    monkeypatch.setattr(ql, "quant_module", lambda: None)
    assert not ql.uses_kernel(x, packed)
    slow = ql.quant_linear(x, packed, bias, out_dtype=torch.float32)
    assert ((fast.double() - slow.double()).abs() <= error_bound(x, w, 64, True)).all()
    dq = ql.quant_linear_dequant(x, packed, bias)
    assert torch.allclose(dq, slow, rtol=1e-4, atol=1e-4)


def test_fallback_is_exact_float32_matmul(monkeypatch):
    monkeypatch.setattr(ql, "quant_module", lambda: None)
    packed, w = make_weight("int4", 33, 64, 16)
    x = torch.randn(4, 64)
    assert torch.allclose(ql.quant_linear(x, packed).double(), x.double() @ w.T, rtol=1e-5, atol=1e-5)


def test_invalid_inputs_are_rejected():
    codes = torch.zeros(8, 48, dtype=torch.uint8)
    with pytest.raises(ValueError):
        ql.pack_int4(codes, torch.ones(8, 2), torch.ones(8, 2), 24)  # group not a multiple of 16
    with pytest.raises(ValueError):
        ql.pack_int8(codes.to(torch.int8), torch.ones(8, 4), 16)  # scales of the wrong shape
    packed, _ = make_weight("int8", 16, 64, 32)
    with pytest.raises(ValueError):
        ql.quant_linear(torch.randn(1, 32), packed)


def k_quant_like(kind: str, n: int, k: int, seed: int = 0):
    """GGUF K-quant-style scales: per 256 columns a float16 d, per group an integer multiplier
    (Q4_K: 6-bit scales and mins, g=32; Q6_K: int8 scales reaching -128, g=16)."""
    gen = torch.Generator().manual_seed(seed)
    g = 32 if kind == "int4" else 16
    per = 256 // g

    def factored(lo: int, hi: int, top: int, sign: float) -> torch.Tensor:
        d = (torch.rand(n, k // 256, 1, generator=gen) * 0.01 * sign).half().float()
        mult = torch.randint(lo, hi + 1, (n, k // 256, per), generator=gen)
        mult[:, :, 0] = top  # the quantizer maps the largest value to the end of the range
        return (d * mult).flatten(1)

    if kind == "int4":
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
        scales, offsets = factored(0, 63, 63, 1.0), factored(0, 63, 63, -1.0)
        return codes, scales, offsets, g
    codes = torch.randint(-32, 32, (n, k), dtype=torch.int8, generator=gen)
    return codes, factored(-128, 127, -128, -1.0), None, g


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_k_quant_scales_are_stored_compactly_and_exactly(kind):
    codes, scales, offsets, g = k_quant_like(kind, 77, 512)
    if kind == "int4":
        packed = ql.pack_int4(codes, scales, offsets, g)
        w = codes.float() * scales.repeat_interleave(g, 1) + offsets.repeat_interleave(g, 1)
        assert packed.offsets.dtype == torch.int8 and packed.offset_d is not None
    else:
        packed = ql.pack_int8(codes, scales, g)
        w = codes.float() * scales.repeat_interleave(g, 1)
    assert packed.scales.dtype == torch.int8 and packed.scale_d.dtype == torch.float32
    assert torch.equal(ql.unpack(packed), w)
    ids = torch.tensor([3, 76, 0])
    assert torch.equal(ql.embedding_rows(packed, ids), w[ids])
    again = type(packed).from_tensors(packed.tensors(), 77)
    assert torch.equal(ql.unpack(again), w)
    bytes_per_weight = packed.nbytes() / (128 * 512)  # rows padded to 128
    assert bytes_per_weight == (0.5 + 2 / 32 + 8 / 256 if kind == "int4" else 1 + 1 / 16 + 4 / 256)
    if ql.quant_module() is not None:
        x = torch.randn(3, 512)
        y = ql.quant_linear(x, packed, out_dtype=torch.float32, precise=True)
        assert ((y.double() - x.double() @ w.double().T).abs() <= error_bound(x, w.double(), g, True)).all()


def test_scales_that_do_not_factor_stay_float():
    codes, scales, offsets, g = k_quant_like("int4", 16, 256)
    scales[3, 2] *= 1.0001  # no longer d * integer
    packed = ql.pack_int4(codes, scales, offsets, g)
    assert packed.scales.dtype == torch.float32 and packed.scale_d is None
    assert torch.equal(ql.unpack(packed), codes.float() * scales.repeat_interleave(g, 1) + offsets.repeat_interleave(g, 1))


@pytest.mark.skipif(
    not (build.cpu_supports("avx512_vnni avx512bw avx512vl") and build.cpu_supports("avx2 fma f16c"))
    or build.target_arch() != "native",
    reason="the native build already is the AVX2 path here (or this run is the AVX2 run)",
)
def test_avx2_path_passes_the_kernel_tests():
    """On an AVX-512 CPU the native build takes the VNNI path; an x86-64-v3 build of the same source takes the AVX2
    path, which CPUs without AVX-512 run. This file's kernel tests run against that build in a child process."""
    env = {**os.environ, "EMBER_KERNEL_MARCH": "x86-64-v3"}
    probe = "from ember.kernels import quant_linear as ql; assert ql.quant_module() is not None"
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=600)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "kernel and not avx2_path", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
