"""`ember calibrate-layer-skip`: choose and save the layers a layer-skip draft passes over."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_calibrate_parser(commands: Any) -> None:
    sub = commands.add_parser(
        "calibrate-layer-skip",
        help="choose the layers a layer-skip draft skips; writes the file speculative_config.skip_layers_file reads",
    )
    sub.add_argument("--model", default=None, help="GGUF file or HF folder (default: Gemma 3 270M Q4_K_M)")
    sub.add_argument("--output", required=True, help="JSON file to write")
    sub.add_argument("--text", default=None,
                     help="calibration text: a UTF-8 file, or ptb-train (default: the model's own greedy continuations "
                          "of built-in code and prose prompts)")  # fmt: skip
    sub.add_argument("--num-tokens", type=int, default=512, help="calibration tokens (default: 512)")
    sub.add_argument("--num-speculative-tokens", type=int, default=4, help="draft length the choice is made for (default: 4)")
    sub.add_argument("--dtype", default="auto", help="compute dtype (default: auto = bfloat16)")
    sub.add_argument("--quantization", default="auto", help="weight quantization, as for `ember generate` (default: auto)")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_argument("--verbose", action="store_true", help="log engine details to stderr")
    sub.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> None:
    from ember.config import EngineConfig
    from ember.engine.llm_engine import LLMEngine
    from ember.errors import InvalidRequestError
    from ember.eval.text import load_text
    from ember.spec.layer_skip import calibrate_skip_layers, calibration_sequences

    if not 16 <= args.num_tokens <= 8192:
        raise InvalidRequestError("--num-tokens must be in [16, 8192]")
    if not 1 <= args.num_speculative_tokens <= 32:
        raise InvalidRequestError("--num-speculative-tokens must be in [1, 32]")
    text = load_text(args.text) if args.text is not None else None
    config = EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization, enable_prefix_caching=False)
    engine = LLMEngine(config)
    sequences = calibration_sequences(engine, text, args.num_tokens)
    result = calibrate_skip_layers(engine, sequences, args.num_speculative_tokens, progress=not args.no_progress)
    result.save(args.output)
    print(
        f"skip layers {result.skip_layers} of {result.num_layers}: agreement {result.agreement:.1%} on "
        f"{result.num_tokens} tokens, estimated {result.estimated_speedup:.2f}x at k={result.num_speculative_tokens}; "
        f"wrote {args.output}\nuse: --speculative-config "
        f"'{{\"method\": \"layer_skip\", \"skip_layers_file\": \"{args.output}\"}}'",
        file=sys.stderr,
    )
