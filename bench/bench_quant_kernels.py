"""Micro-benchmark of the weight-only int4/int8 matmul paths on Gemma 3 270M shapes.

Prints ms per call and GB/s of weight bytes streamed (packed bytes for quantized paths) for:
bf16 F.linear, torch's packed int8/int4 ops, and ember's kernels (int4/int8, g=32, precise and int8-
activation variants). The CPU may be shared: each number is the best of several repeats. Layer shapes
at batch <= 64 are timed cold (weights flushed from cache, as in decode of a model larger than L3).

    .venv/bin/python bench/bench_quant_kernels.py [--batches 1,8,64] [--shapes lm_head,qkv] [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import ember  # noqa: F401  (OpenMP wait policy before torch loads)
import torch
import torch.nn.functional as F

from ember.kernels import gemv
from ember.kernels import quant_linear as ql

SHAPES = {  # name: (N out, K in)
    "lm_head": (262144, 640),
    "qkv": (1536, 640),
    "o": (640, 1024),
    "gate_up": (4096, 640),
    "down": (640, 2048),
}


_FLUSH = None


def cold_ms(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    """Best single call with the weights out of cache, as in decode (the int4 model exceeds the 32 MB L3):
    64 MB are written between calls."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.zeros(16 << 20)
    best = float("inf")
    for _ in range(repeats):
        _FLUSH.add_(1.0)
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best * 1e3


def best_ms(fn: Callable[[], object], repeats: int, budget_s: float, clock: Callable[[], float]) -> float:
    fn()
    t0 = clock()
    fn()
    once = max(clock() - t0, 1e-6)
    iters = max(1, int(budget_s / once))
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for _ in range(iters):
            fn()
        best = min(best, (clock() - t0) / iters)
    return best * 1e3


def make_paths(n: int, k: int, g: int) -> dict[str, tuple[Callable[[torch.Tensor], object], int]]:
    """name -> (fn(x_bf16), weight bytes streamed per call)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).bfloat16()
    codes4 = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    codes8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, k // g, generator=gen) * 0.01
    offsets = -8 * scales
    p4 = ql.pack_int4(codes4, scales, offsets, g)
    p8 = ql.pack_int8(codes8, scales, g)
    p4h = ql.pack_int4(codes4, scales, offsets, g, torch.float16)
    p8h = ql.pack_int8(codes8, scales, g, torch.float16)
    paths: dict[str, tuple[Callable[[torch.Tensor], object], int]] = {
        "bf16 F.linear": (lambda x: F.linear(x, w), w.numel() * 2),
    }
    # torch's own packed ops: int8 per-channel (bf16 scales), int4 g=128 (the fastest group it has).
    s8 = torch.rand(n, generator=gen).bfloat16()
    paths["torch int8pack"] = (lambda x: torch._weight_int8pack_mm(x, codes8, s8), codes8.numel() + n * 2)
    gt = 128 if k % 128 == 0 else 64
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes4.to(torch.int32), 1)
    sz = torch.stack((torch.rand(k // gt, n), torch.rand(k // gt, n)), dim=2).bfloat16()
    paths[f"torch int4pack g{gt}"] = (
        lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, gt, sz),
        w4.numel() * w4.element_size() + sz.numel() * 2,
    )
    paths["ember bf16 gemv (M<=8)"] = (lambda x: gemv.linear(x, w), w.numel() * 2)
    # precise: two-part activations; i8act: int8 activations. The default picks precise up to 4 rows.
    for name, p in ((f"ember int4 g{g}", p4), (f"ember int8 g{g}", p8), (f"ember int4 g{g} f16s", p4h), (f"ember int8 g{g} f16s", p8h)):
        paths[name + " precise"] = (lambda x, p=p: ql.quant_linear(x, p, precise=True), p.nbytes())
        paths[name + " i8act"] = (lambda x, p=p: ql.quant_linear(x, p, precise=False), p.nbytes())
    if n * k < 10_000_000:  # the PyTorch dequantization of the LM head alone takes seconds
        for name, p in ((f"dequant+F.linear int4 g{g}", p4), (f"dequant+F.linear int8 g{g}", p8)):
            paths[name] = (lambda x, p=p: ql.quant_linear_dequant(x, p), p.nbytes())
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8,16,64,512")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--paths", default="", help="comma-separated substrings selecting paths")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--budget", type=float, default=0.15, help="seconds per repeat")
    ap.add_argument("--warm", action="store_true", help="time layer shapes with weights in cache (default: cold)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="with --threads 1: time the thread's CPU time, which ignores time slices lost to other processes",
    )
    args = ap.parse_args()
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()}  kernel={'yes' if ql.quant_module() else 'no (fallback)'}")
    print(f"{'shape':>8} {'M':>4} {'path':<28} {'ms':>9} {'GB/s':>7}")
    selected = [s for s in args.paths.split(",") if s]
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        paths = make_paths(n, k, args.group)
        for m in map(int, args.batches.split(",")):
            if shape == "lm_head" and m > 64:
                continue  # prefill only needs the last position's logits
            x = torch.randn(m, k).bfloat16()
            for name, (fn, nbytes) in paths.items():
                if selected and not any(s in name for s in selected):
                    continue
                if shape == "lm_head" or m > 64 or args.warm:
                    ms = best_ms(lambda: fn(x), args.repeats, args.budget, clock)
                else:
                    ms = cold_ms(lambda: fn(x), args.repeats * 8, clock)
                print(f"{shape:>8} {m:>4} {name:<28} {ms:9.3f} {nbytes / ms / 1e6:7.1f}", flush=True)


if __name__ == "__main__":
    main()
