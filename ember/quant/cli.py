"""`ember quantize`: quantize a model's linear layers with RTN, GPTQ or AWQ and write an ember quantized
checkpoint (`ember.quant.checkpoint`) that `LLM(out_dir)` loads as is, with no calibration at load time.

Pipeline: load the model in float32 (quantized GGUF weights dequantized) -> calibration statistics on PTB
train (GPTQ, AWQ) -> AWQ scaling folded into the float model (awq, awq-gptq) -> each linear layer
quantized (RTN, or GPTQ with its Hessian) -> installed into the model -> saved; the float tensors left
(norms, biases, a float embedding) are stored in --dtype.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ember.errors import InvalidRequestError
from ember.quant.scheme import GROUP_SIZES, PER_CHANNEL, QuantizedWeight, QuantScheme, quantize_rtn

logger = logging.getLogger("ember")

METHODS = ("rtn", "gptq", "awq", "awq-gptq")


@dataclass
class QuantizeOptions:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128  # -1: per output channel
    act_order: bool = False
    lm_head: bool = False
    calib_samples: int = 128
    calib_len: int = 512
    seed: int = 0
    damp: float = 0.01
    calib_text: str = "ptb-train"
    dtype: str = "bfloat16"  # of the float tensors saved alongside the quantized ones

    def scheme(self) -> QuantScheme:
        # int8 is symmetric only (the kernel has no offsets); int4 is asymmetric.
        return QuantScheme(self.bits, self.group_size, symmetric=self.bits == 8)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.group_size != PER_CHANNEL and self.group_size not in GROUP_SIZES:
            raise InvalidRequestError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))} or -1 (per channel)")
        self.scheme()
        if self.act_order and "gptq" not in self.method:
            raise InvalidRequestError("--act-order applies to GPTQ only (--method gptq or awq-gptq)")


@dataclass
class QuantizeSummary:
    out_dir: str
    method: str
    scheme: str
    layers: int
    lm_head: bool
    seconds: float
    calibration_tokens: int = 0
    # Per layer: relative output error on the calibration set, ||X (W - Wq)^T||^2 / ||X W^T||^2.
    relative_error: dict[str, float] = field(default_factory=dict)
    awq_alphas: dict[str, float] = field(default_factory=dict)
    awq_skipped: dict[str, str] = field(default_factory=dict)


def quantize_model(model_path: str | None, out_dir: str, options: QuantizeOptions, progress: bool = True) -> QuantizeSummary:
    """Quantize `model_path` (GGUF or HF folder; None: the default model) into the checkpoint `out_dir`."""
    from ember.eval.scoring import EmberScorer
    from ember.model_zoo import default_model_path
    from ember.quant.awq import apply_awq, output_error
    from ember.quant.calibration import LM_HEAD, calibration_samples, collect_stats, linear_layers
    from ember.quant.checkpoint import install_quantized, save_quantized
    from ember.quant.gptq import gptq_quantize

    options.validate()
    started = time.perf_counter()
    source = model_path or default_model_path()
    scheme = options.scheme()
    # float32 so calibration statistics and AWQ folding are not rounded to bf16 along the way.
    scorer = EmberScorer(source, options.calib_len, dtype="float32", quantization="none")
    model = scorer.model
    body = [name for name in linear_layers(model) if name != "lm_head"]
    head_name = "lm_head" if getattr(model, "lm_head", None) is not None else "model.embed_tokens"
    stats: dict[str, Any] = {}
    if options.method != "rtn":
        samples = calibration_samples(scorer.tokenizer, options.calib_samples, options.calib_len, options.seed, options.calib_text)
        stats = collect_stats(scorer, samples, body, lm_head=options.lm_head, progress=progress)
    hessians = {name: s.mean_hessian() for name, s in stats.items()}
    summary = QuantizeSummary(out_dir, options.method, scheme.name, 0, options.lm_head, 0.0)
    summary.calibration_tokens = next(iter(stats.values())).rows if stats else 0
    if options.method.startswith("awq"):
        scaled, report = apply_awq(model, stats, scheme, progress=progress)
        hessians.update(scaled)
        summary.awq_alphas, summary.awq_skipped = report.alphas, report.skipped
        summary.awq_skipped["lm_head"] = "not scaled (a tied head is also the input embedding)"
    modules = dict(model.named_modules())
    targets = [(name, name) for name in body] + ([(head_name, LM_HEAD)] if options.lm_head else [])
    weights: dict[str, QuantizedWeight] = {}
    for name, stats_key in tqdm(targets, desc=f"Quantizing ({options.method}, {scheme.name})", unit="layer", disable=not progress):
        weight = modules[name].weight.data.to(torch.float32)
        h = hessians.get(stats_key)
        if "gptq" in options.method:
            q = gptq_quantize(weight, h, scheme, damp=options.damp, act_order=options.act_order)
        else:
            q = quantize_rtn(weight, scheme)
        weights[name] = q
        if h is not None:
            reference = float(((weight @ h) * weight).sum())
            summary.relative_error[name] = output_error(weight, q.dequantize(), h) / max(reference, 1e-30)
    install_quantized(model, weights)
    _cast_float_tensors(model, options.dtype)
    save_quantized(model, out_dir, tokenizer_source=source, method=options.method)
    summary.layers = len(weights)
    summary.seconds = time.perf_counter() - started
    return summary


def _cast_float_tensors(model: torch.nn.Module, dtype: str) -> None:
    from ember.config import resolve_dtype

    target = resolve_dtype(dtype)
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(target)


def add_quantize_parser(commands: Any) -> None:
    sub = commands.add_parser(
        "quantize", help="quantize a model (RTN, GPTQ or AWQ) into a checkpoint that `ember generate --model DIR` runs"
    )
    sub.add_argument("--model", default=None, help="GGUF file or HF folder (default: Gemma 3 270M Q4_K_M)")
    sub.add_argument("--out", required=True, help="output folder of the quantized checkpoint")
    sub.add_argument(
        "--method", choices=METHODS, default="gptq",
        help="rtn (no calibration), gptq, awq (scaling + RTN) or awq-gptq (scaling + GPTQ) (default: gptq)",
    )
    sub.add_argument("--bits", type=int, choices=(4, 8), default=4, help="4 (asymmetric) or 8 (symmetric) (default: 4)")
    sub.add_argument(
        "--group-size", type=int, default=128, help="input columns per scale: 16, 32, 64, 128 or -1 per channel (default: 128)"
    )
    sub.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    sub.add_argument("--lm-head", action="store_true", help="also quantize the LM head (a tied embedding table with it)")
    sub.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default: 128)")
    sub.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    sub.add_argument("--calib-text", default="ptb-train", help="calibration text: ptb-train or a file (default: ptb-train)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the calibration start offsets (default: 0)")
    sub.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag(H) (default: 0.01)")
    sub.add_argument("--dtype", default="bfloat16", help="dtype of the float tensors saved (default: bfloat16)")
    sub.add_argument("--json", default=None, metavar="FILE", help="also write a summary (per-layer errors) as JSON")
    sub.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_argument("--verbose", action="store_true", help="log engine details to stderr")
    sub.set_defaults(handler=run_quantize)


def run_quantize(args: argparse.Namespace) -> None:
    options = QuantizeOptions(
        method=args.method, bits=args.bits, group_size=args.group_size, act_order=args.act_order, lm_head=args.lm_head,
        calib_samples=args.calib_samples, calib_len=args.calib_len, seed=args.seed, damp=args.damp,
        calib_text=args.calib_text, dtype=args.dtype,
    )
    summary = quantize_model(args.model, args.out, options, progress=not args.no_progress)
    errors = summary.relative_error
    mean_error = sum(errors.values()) / len(errors) if errors else None
    print(
        f"wrote {summary.out_dir}: {summary.layers} layers {summary.method} {summary.scheme}"
        f"{' + LM head' if summary.lm_head else ''} in {summary.seconds:.1f} s"
        + (f"; calibration {summary.calibration_tokens} tokens, mean relative output error {mean_error:.2e}" if errors else "")
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(asdict(summary), f, indent=2)
            f.write("\n")
