"""Grammar token masks on logits: -inf wherever a request's bitmask (xgrammar's layout, int32 words, bit j
of word w = token 32w + j) has a 0. token_mask.cpp does it at memory speed (vector blends); the
PyTorch code below is the fallback (no compiler, another device, EMBER_DISABLE_KERNELS=1) and the reference
the kernel is tested against."""

from __future__ import annotations

from types import ModuleType

import torch

from ember.kernels.build import load_kernel


def token_mask_module() -> ModuleType | None:
    return load_kernel("token_mask", "avx2")


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: logits[rows[i]] keeps only the tokens whose bit is set in bitmask[i]."""
    if not rows:
        return
    index = torch.tensor(rows, dtype=torch.long)
    if (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and logits.stride(1) == 1
        and bitmask.is_contiguous()
        and token_mask_module() is not None
    ):
        token_mask_module().apply_token_bitmask(logits, bitmask, index)
        return
    apply_token_bitmask_reference(logits, bitmask, index.to(logits.device))


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    vocab = logits.shape[-1]
    words = bitmask[: len(rows)].to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :vocab].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
