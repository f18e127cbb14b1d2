"""bf16 x @ W.T: ember's kernel (gemv_bf16.cpp: the GEMV up to 8 rows, the batch-invariant blocked GEMM beyond)
against oneDNN's F.linear, on Gemma 3 270M's shapes (qkv 640->1280, gate_up 640->4096, down 2048->640, the
262144-row LM head). Best of 5 per cell; also the largest difference from a float32 reference.

    .venv/bin/python bench/bench_gemm_bf16.py

What invariance costs on the bf16 path (EngineConfig.batch_invariant=False takes oneDNN from 9 rows on).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ember  # noqa: F401  (OpenMP wait policy before torch loads)
import torch
import torch.nn.functional as F

from ember.kernels.gemv import gemv_module

SHAPES = [(1280, 640), (4096, 640), (640, 2048), (262144, 640)]
ROWS = [9, 16, 64, 256, 512, 2048]


def best_ms(f: Callable[[], object], repeats: int = 5) -> float:
    f()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    kernel = gemv_module()
    if kernel is None:
        raise SystemExit("the bf16 kernel is not available here (no avx512_bf16 or no compiler)")
    print(f"threads {torch.get_num_threads()}")
    print("| N x K | rows | oneDNN ms | ember ms | ember / oneDNN | ember GFLOP/s | max abs err vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n, k in SHAPES:
        w = torch.randn(n, k).bfloat16()
        for m in ROWS:
            if n * m > 262144 * 64:
                continue
            x = torch.randn(m, k).bfloat16()
            onednn = best_ms(lambda: F.linear(x, w))
            ours = best_ms(lambda: kernel.gemv_bf16(x, w, False))
            err = float((F.linear(x.float(), w.float()) - kernel.gemv_bf16(x, w, True)).abs().max())
            print(f"| {n} x {k} | {m} | {onednn:.2f} | {ours:.2f} | {ours / onednn:.2f} | "
                  f"{2 * m * n * k / ours / 1e6:.0f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
