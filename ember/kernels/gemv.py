"""bf16 GEMV for decode: y = x W^T for a few rows of x, streaming W at near memory bandwidth.

oneDNN's bf16 path through F.linear reaches ~25 GB/s on the 262144x640 LM head and costs ~40 us per
small projection on 2 cores; the AVX-512 BF16 kernel in gemv_bf16.cpp reaches ~37 GB/s and ~10 us.
It needs a CPU with avx512_bf16 and a C++ compiler; otherwise F.linear is used. Set
EMBER_DISABLE_KERNELS=1 to force the fallback.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from ember.kernels.build import load_kernel

MAX_ROWS = 8  # beyond this the matmul is compute-bound and oneDNN's GEMM wins


def gemv_module() -> ModuleType | None:
    return load_kernel("gemv_bf16", "avx512_bf16")


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and 1 <= rows <= MAX_ROWS
        and gemv_module() is not None
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """F.linear, through the GEMV kernel for small bf16 batches. `out_dtype` float32 keeps the kernel's
    fp32 accumulators (the LM head wants float32 logits anyway)."""
    if not uses_kernel(x, weight):
        y = F.linear(x, weight, bias)
        return y if out_dtype is None else y.to(out_dtype)
    want_fp32 = out_dtype == torch.float32
    y = gemv_module().gemv_bf16(x.reshape(-1, x.shape[-1]), weight, want_fp32).view(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y = y + bias
    return y if out_dtype in (None, y.dtype) else y.to(out_dtype)
