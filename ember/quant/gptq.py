"""GPTQ (Frantar et al., 2022): quantize a weight column by column, each time spreading the column's
rounding error over the columns not yet quantized so that the layer output X W^T changes least.

For a layer input X with H = 2 X^T X, the output error of a weight change dW is tr(dW H dW^T) / 2. Fixing
column j to its quantized value q_j and re-optimizing the later columns gives the update

    W[:, j+1:] -= (w_j - q_j) / U[j, j] * U[j, j+1:]

where U is the upper Cholesky factor of H^-1 (row j of U carries exactly the inverse-Hessian terms that
remain after columns < j are fixed, so no inverse is re-computed per column). Updates are applied
lazily: inside a block of columns immediately, to the columns after the block once per block (one matmul).

Details that matter:

* damping: H += damp * mean(diag H) * I keeps the Cholesky stable when X is rank-deficient;
* dead inputs (diag H = 0, a channel that was always 0) get weight 0 and H_jj = 1;
* group parameters (scale, offset) follow ember's RTN formulas (`quantize_rtn`) exactly. Without
  act-order they are computed when the group's first column comes up, from the weights as updated by
  then (the usual GPTQ choice); with act-order (columns visited by decreasing H_jj) a group's columns are
  visited out of order, so each group's parameters are fixed up front from the original weights
  ("static groups"). Groups stay the original consecutive columns in both cases, so the output is a plain
  `QuantizedWeight` (no column permutation to store or apply at run time).
"""

from __future__ import annotations

import torch

from ember.errors import InvalidRequestError
from ember.quant.scheme import PER_CHANNEL, QuantizedWeight, QuantScheme, quantize_rtn


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> QuantizedWeight:
    """weight [N, K] (any float dtype), hessian [K, K] (X^T X up to a positive factor) -> QuantizedWeight."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise InvalidRequestError(f"GPTQ: Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    if not 0 <= damp < 1:
        raise InvalidRequestError(f"GPTQ: damping must be in [0, 1), got {damp}")
    group = scheme.group_for(k)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # Blocks hold whole groups (or groups whole blocks), so a group starts either mid-block (parameters
    # from the block's updated copy) or at a block start (from W, fully updated by then).
    if group < block_size:
        block_size -= block_size % group
    static = quantize_rtn(w, scheme) if act_order else None
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    w = w[:, order]
    h = h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    u = _inverse_cholesky_upper(h).to(torch.float32)

    groups = k // group
    scales = static.scales.clone() if static else torch.empty(n, groups)
    offsets = (static.offsets.clone() if static.offsets is not None else None) if static else (
        torch.empty(n, groups) if scheme.bits == 4 else None
    )
    codes = torch.empty(n, k, dtype=torch.uint8 if scheme.bits == 4 else torch.int8)
    column_group = (order // group).tolist()
    # The column loop is thousands of tiny ops: handing each to a second OpenMP thread costs more than the
    # op (67 s instead of 1.5 s for a 4096 x 640 layer on a busy 2-core machine), so it runs on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _gptq_columns(w, u, codes, scales, offsets, static is not None, column_group, group, block_size, scheme)
    finally:
        torch.set_num_threads(threads)
    unpermuted = torch.empty_like(codes)
    unpermuted[:, order] = codes
    return QuantizedWeight(scheme, unpermuted, scales.contiguous(), None if offsets is None else offsets.contiguous())


def _gptq_columns(
    w: torch.Tensor, u: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
    static: bool, column_group: list[int], group: int, block_size: int, scheme: QuantScheme,
) -> None:
    """Quantize w's columns in order, in place into codes/scales/offsets, spreading each column's error
    over the columns not yet quantized (lazy block updates)."""
    k = w.shape[1]
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            col = start + i
            g = column_group[col]
            if not static and col % group == 0:
                source = w[:, col : col + group] if i == 0 else block[:, i : i + group]
                scales[:, g], offset = _group_params(source, scheme)
                if offsets is not None:
                    offsets[:, g] = offset
            column = block[:, i]
            q_codes, q = _quantize_column(column, scales[:, g], offsets[:, g] if offsets is not None else None, scheme)
            codes[:, col] = q_codes
            err = (column - q) / u_block[i, i]
            block[:, i:].sub_(err[:, None] * u_block[i, i:][None, :])
            errors[:, i] = err
        w[:, end:].sub_(errors @ u[start:end, end:])


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, raising more damping as a clear error if H is not positive definite."""
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError as e:
        raise InvalidRequestError("GPTQ: the Hessian is not positive definite; raise the damping (--damp)") from e


def _group_params(columns: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and offset of one group [N, g] by ember's RTN formulas (one group per row)."""
    per_row = quantize_rtn(columns, QuantScheme(scheme.bits, PER_CHANNEL, scheme.symmetric))
    return per_row.scales[:, 0], None if per_row.offsets is None else per_row.offsets[:, 0]


def _quantize_column(
    column: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized values) of one column on its group's grid, rounded as `quantize_rtn` rounds."""
    if offset is None:  # int8 symmetric
        q = torch.round(column / scale).clamp_(-127, 127)
        return q.to(torch.int8), q * scale
    q = torch.round((column - offset) / scale).clamp_(0, 15)
    return q.to(torch.uint8), q * scale + offset
