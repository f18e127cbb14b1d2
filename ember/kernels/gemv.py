"""bf16 y = x W^T through gemv_bf16.cpp: a GEMV for decode (a few rows, streaming W near memory bandwidth)
and, for more rows, a blocked GEMM with the same arithmetic per output element, so a row's result does not
depend on how many rows share the call (batch invariance: the same request alone, in a batch, or as part of a
chunked prompt gives bitwise-equal values).

oneDNN's bf16 path through F.linear reaches ~25 GB/s on the 262144x640 LM head and costs ~40 us per
small projection on 2 cores; the GEMV reaches ~37 GB/s and ~10 us. From 64 rows oneDNN's GEMM is faster
than the blocked kernel (1.0-1.6x on Gemma 3 270M shapes, BENCHMARKS.md), and its result depends on the row
count: `invariant=False` takes it there (EngineConfig.batch_invariant=False).
The kernel needs a CPU with avx512_bf16 and a C++ compiler; otherwise F.linear is used. Set
EMBER_DISABLE_KERNELS=1 to force the fallback.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from ember.kernels.build import load_kernel

MAX_ROWS = 8  # the GEMV's rows; beyond, the kernel's blocked GEMM (invariant) or oneDNN's (not)


def gemv_module() -> ModuleType | None:
    return load_kernel("gemv_bf16", "avx512_bf16")


def uses_kernel(x: torch.Tensor, weight: torch.Tensor, invariant: bool = True) -> bool:
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and 1 <= rows
        and (invariant or rows <= MAX_ROWS)
        and gemv_module() is not None
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    invariant: bool = True,
) -> torch.Tensor:
    """F.linear, through the kernel for bf16 (every row count when `invariant`, else the GEMV's 1-8).
    `out_dtype` float32 keeps the kernel's fp32 accumulators (the LM head wants float32 logits anyway)."""
    if not uses_kernel(x, weight, invariant):
        y = F.linear(x, weight, bias)
        return y if out_dtype is None else y.to(out_dtype)
    want_fp32 = out_dtype == torch.float32
    y = gemv_module().gemv_bf16(x.reshape(-1, x.shape[-1]), weight, want_fp32).view(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y = y + bias
    return y if out_dtype in (None, y.dtype) else y.to(out_dtype)
