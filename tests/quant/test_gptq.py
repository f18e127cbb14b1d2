"""GPTQ: equals RTN when inputs are uncorrelated (identity Hessian), and beats RTN's output error on a
layer whose calibration inputs are correlated and have outlier channels."""

from __future__ import annotations

import pytest
import torch

from ember.quant.gptq import gptq_quantize
from ember.quant.scheme import QuantScheme, quantize_rtn

SCHEMES = [QuantScheme(4, 32), QuantScheme(4, 128), QuantScheme(4, 64, symmetric=True), QuantScheme(8, 32, True),
           QuantScheme(8, -1, True)]  # fmt: skip


@pytest.fixture(scope="module")
def layer():
    generator = torch.Generator().manual_seed(0)
    n, k, t = 96, 256, 1024
    weight = torch.randn(n, k, generator=generator) * 0.05
    mixing = torch.randn(k, k, generator=generator) / k**0.5
    x = torch.randn(t, k, generator=generator) @ mixing + 0.1 * torch.randn(t, k, generator=generator)
    x[:, :6] *= 8  # a few outlier channels, as real activations have
    return weight, x


def _error(weight: torch.Tensor, x: torch.Tensor, q) -> float:  # noqa: ANN001
    return ((x @ weight.T - x @ q.dequantize().T) ** 2).sum().item()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_identity_hessian_is_rtn(scheme):
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    gptq, rtn = gptq_quantize(weight, torch.eye(256), scheme), quantize_rtn(weight, scheme)
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scales, rtn.scales)
    assert (gptq.offsets is None) == (rtn.offsets is None)
    if rtn.offsets is not None:
        assert torch.equal(gptq.offsets, rtn.offsets)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_gptq_output_error_below_rtn(layer, scheme, act_order):
    weight, x = layer
    hessian = 2 * x.T @ x
    gptq = gptq_quantize(weight, hessian, scheme, act_order=act_order)
    assert gptq.codes.dtype == quantize_rtn(weight, scheme).codes.dtype and gptq.scales.shape[1] == 256 // gptq.group_size
    rtn_error, gptq_error = _error(weight, x, quantize_rtn(weight, scheme)), _error(weight, x, gptq)
    assert gptq_error < 0.6 * rtn_error


def test_dead_inputs_and_bad_hessian():
    weight = torch.randn(8, 64)
    x = torch.randn(100, 64)
    x[:, 5] = 0  # a channel that is always zero: its weights do not matter and must not break Cholesky
    q = gptq_quantize(weight, x.T @ x, QuantScheme(4, 32))
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(Exception, match="Hessian"):
        gptq_quantize(weight, torch.eye(32), QuantScheme(4, 32))
