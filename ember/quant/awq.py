"""AWQ-style activation-aware scaling (Lin et al., 2023): before rounding, scale each input channel k of a
weight by s_k and divide the activation by s_k. The float model is unchanged, but channels that carry
large activations get a finer effective grid, which lowers the output error after quantization.

Per layer, s = m^alpha with m = mean |x| per input channel over the calibration tokens, normalized to
geometric mean ~1 (s / sqrt(max s * min s)); alpha is picked from a grid on [0, 1) to minimize the layer's
output error after quantizing the scaled weight:

    loss(alpha) = ||X W^T - (X / s) Q(W diag(s))^T||^2 = tr(E H E^T),  E = W - Q(W diag(s)) diag(1/s)

with H = X^T X from calibration (so every calibration token counts, with no stored activations).
alpha = 0 is s = 1, plain RTN, so the chosen scaling never has a higher loss than RTN on this objective.

Folding 1/s, per decoder layer (exact in float arithmetic):

* qkv_proj reads input_layernorm(x): the norm's weight is divided by s (Gemma's (1 + w) norms: the
  effective weight (1 + w) is divided, i.e. w <- (1 + w) / s - 1);
* gate_up_proj reads the pre-MLP norm (post_attention_layernorm in Llama, pre_feedforward_layernorm
  in Gemma 3): the same;
* down_proj reads act(gate) * up: the up rows of gate_up_proj are divided by s;
* o_proj reads softmax(QK^T) V: the v rows of qkv_proj (and v's bias) are divided by s. Query heads
  sharing a KV head (GQA) read the same v channels, so s is tied across them (m averaged over the
  group before s is formed).

Not scaled: the LM head (its input, the final norm, could absorb 1/s, but a tied head is also the input
embedding, which would then be wrong; it is quantized plainly). Weight clipping search (AWQ's second
step) is not done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ember.quant.calibration import InputStats
from ember.quant.scheme import QuantScheme, quantize_rtn

DEFAULT_GRID = 20


@dataclass
class AWQReport:
    """Chosen alpha and the relative output-error reduction vs RTN, per layer name."""

    alphas: dict[str, float] = field(default_factory=dict)
    loss_ratio: dict[str, float] = field(default_factory=dict)  # AWQ loss / RTN loss (<= 1)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it was not scaled


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H E^T) for E = weight - dequantized: the squared output error over the calibration rows."""
    error = weight - dequantized
    return float(((error @ hessian) * error).sum())


def search_scale(
    weight: torch.Tensor, hessian: torch.Tensor, mean_abs: torch.Tensor, scheme: QuantScheme, grid: int = DEFAULT_GRID,
    fixed_alpha: float | None = None,
) -> tuple[torch.Tensor, float, float, float]:
    """Best per-input-channel scale s [K] for weight [N, K] -> (s, alpha, loss, loss at alpha = 0 (RTN)).
    `fixed_alpha` skips the search (alpha = 0 is still evaluated, for the RTN loss)."""
    w = weight.to(torch.float32)
    h = hessian.to(torch.float32)
    m = mean_abs.to(torch.float32).clamp(min=1e-5)
    best = (torch.ones_like(m), 0.0, float("inf"))
    rtn_loss = float("inf")
    alphas = [step / grid for step in range(grid)] if fixed_alpha is None else [0.0, fixed_alpha]
    for step, alpha in enumerate(alphas):
        s = m.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        dequantized = quantize_rtn(w * s, scheme).dequantize() / s
        loss = output_error(w, dequantized, h)
        if step == 0:
            rtn_loss = loss
        if loss < best[2] or (fixed_alpha is not None and step == 1):
            best = (s, alpha, loss)
    return best[0], best[1], best[2], rtn_loss


def _fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    weight = norm.weight.data
    if getattr(norm, "unit_offset", False):
        weight.copy_(((1.0 + weight.double()) / s.double() - 1.0).to(weight.dtype))
    else:
        weight.copy_((weight.double() / s.double()).to(weight.dtype))
    if hasattr(norm, "process_weights_after_loading"):
        norm.process_weights_after_loading()  # refresh any cached (1 + w)


def _scale_columns(linear: nn.Module, s: torch.Tensor) -> None:
    linear.weight.data.mul_(s.to(linear.weight.dtype)[None, :])


def _divide_rows(linear: nn.Module, start: int, s: torch.Tensor) -> None:
    rows = slice(start, start + s.numel())
    linear.weight.data[rows] /= s.to(linear.weight.dtype)[:, None]
    if linear.bias is not None:
        linear.bias.data[rows] /= s.to(linear.bias.dtype)


def _scaled_hessian(hessian: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of the scaled input X / s: diag(1/s) H diag(1/s) (for GPTQ after AWQ)."""
    inv = 1.0 / s
    return hessian * inv[:, None] * inv[None, :]


def apply_awq(
    model: nn.Module,
    stats: dict[str, InputStats],
    scheme: QuantScheme,
    grid: int = DEFAULT_GRID,
    progress: bool = True,
    fixed_alpha: float | None = None,
) -> tuple[dict[str, torch.Tensor], AWQReport]:
    """Scale and fold every decoder layer of a float model in place. Returns the Hessians of the scaled
    inputs (for GPTQ on the scaled weights), by layer name, and the report. `fixed_alpha` forces one
    alpha everywhere instead of searching."""
    report = AWQReport()
    hessians: dict[str, torch.Tensor] = {}
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    layers = list(enumerate(model.model.layers))

    def scale(name: str, linear: nn.Module, m: torch.Tensor, fold: Callable[[torch.Tensor], None]) -> None:
        if name not in stats:
            report.skipped[name] = "no calibration statistics"
            return
        h = stats[name].mean_hessian()
        s, alpha, loss, rtn = search_scale(linear.weight.data, h, m, scheme, grid, fixed_alpha)
        fold(s)
        _scale_columns(linear, s)
        hessians[name] = _scaled_hessian(h, s)
        report.alphas[name] = alpha
        report.loss_ratio[name] = loss / rtn if rtn > 0 else 1.0

    for i, layer in tqdm(layers, desc="AWQ scaling", unit="layer", disable=not progress):
        prefix = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        # Row scalings first (they change qkv / gate_up rows), then the column scalings of those layers,
        # so every search sees the weights that will actually be quantized.
        down = f"{prefix}.mlp.down_proj"
        if down in stats:
            up_start = mlp.intermediate_size
            scale(down, mlp.down_proj, stats[down].mean_abs, lambda s: _divide_rows(mlp.gate_up_proj, up_start, s))
        o = f"{prefix}.self_attn.o_proj"
        if o in stats:
            head_dim = attn.head_dim
            # One s per v channel: average m over the query heads that share each KV head.
            m = stats[o].mean_abs.view(attn.num_kv_heads, group, head_dim).mean(1, keepdim=True)
            m = m.expand(-1, group, -1).reshape(-1)
            v_start = attn.qkv_proj.shard_sizes[0] + attn.qkv_proj.shard_sizes[1]

            def fold_v(s: torch.Tensor) -> None:
                _divide_rows(attn.qkv_proj, v_start, s.view(attn.num_kv_heads, group, head_dim)[:, 0].reshape(-1))

            scale(o, attn.o_proj, m, fold_v)
        gate_up = f"{prefix}.mlp.gate_up_proj"
        # Gemma 3's post_attention_layernorm normalizes the attention output; its MLP input norm is separate.
        mlp_norm = layer.pre_feedforward_layernorm if hasattr(layer, "pre_feedforward_layernorm") else layer.post_attention_layernorm
        if gate_up in stats:
            scale(gate_up, mlp.gate_up_proj, stats[gate_up].mean_abs, lambda s: _fold_into_norm(mlp_norm, s))
        qkv = f"{prefix}.self_attn.qkv_proj"
        if qkv in stats:
            scale(qkv, attn.qkv_proj, stats[qkv].mean_abs, lambda s: _fold_into_norm(layer.input_layernorm, s))
    return hessians, report
