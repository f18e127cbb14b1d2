"""The token-mask kernel against its PyTorch reference (and xgrammar's own CPU kernel)."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.token_mask import apply_token_bitmask, apply_token_bitmask_reference, token_mask_module


@pytest.mark.parametrize("vocab", [512, 1000, 262144])
def test_kernel_matches_reference(vocab):
    g = torch.Generator().manual_seed(vocab)
    words = -(-vocab // 32)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=g)
    bitmask[0, : words // 2] = 0  # whole words forbidden
    bitmask[1, : words // 2] = -1  # whole words allowed
    logits = torch.randn(5, vocab, generator=g)
    rows = [4, 0, 2]
    got, expected = logits.clone(), logits.clone()
    apply_token_bitmask(got, bitmask, rows)
    apply_token_bitmask_reference(expected, bitmask, torch.tensor(rows))
    assert torch.equal(got, expected)
    assert torch.equal(got[[1, 3]], logits[[1, 3]])  # rows not listed are untouched
    bits = (bitmask[0, vocab // 32 - 1] >> (vocab % 32 or 32) - 1) & 1
    assert bool(torch.isinf(got[4, vocab - 1])) == (not bool(bits)) or vocab % 32


def test_kernel_builds_on_this_machine():
    if "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("the kernel needs AVX2")
    assert token_mask_module() is not None


def test_matches_xgrammar():
    xgr = pytest.importorskip("xgrammar")
    g = torch.Generator().manual_seed(1)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 40), dtype=torch.int32, generator=g)
    logits = torch.randn(2, 1270, generator=g)
    ours, theirs = logits.clone(), logits.clone()
    apply_token_bitmask(ours, bitmask, [0, 1])
    xgr.apply_token_bitmask_inplace(theirs, bitmask)
    assert torch.equal(ours, theirs)
