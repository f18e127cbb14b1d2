"""`ember eval perplexity` and `ember eval kld`: model quality on a text, for comparing quantizations and
engines. Both score the same tokens under the window rule of `ember.eval.windows`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ember.errors import InvalidRequestError
from ember.eval.scoring import Scorer, make_scorer, uses_bos
from ember.eval.text import WindowPlan, load_text, tokenize_text


def add_eval_parser(commands: Any) -> None:
    """Add `eval perplexity` and `eval kld` to the CLI's subcommands."""
    evaluate = commands.add_parser("eval", help="model quality: perplexity, KL divergence against a reference")
    kinds = evaluate.add_subparsers(dest="eval_command", required=True)
    ppl = kinds.add_parser(
        "perplexity", help="token-level perplexity (the model's own tokens, e.g. BPE pieces) over sliding windows"
    )
    kld = kinds.add_parser("kld", help="KL divergence of next-token distributions against a reference model or file")
    for sub in (ppl, kld):
        sub.add_argument("--model", default=None, help="GGUF file or HF folder (default: Gemma 3 270M Q4_K_M)")
        sub.add_argument("--dtype", default="auto", help="ember compute dtype (default: auto = bfloat16)")
        sub.add_argument(
            "--quantization", default=None,
            help="ember weight quantization as in `ember generate` (auto, none = dequantize, int4, ...; default: auto)",
        )
        sub.add_argument("--lm-head-quantization", default=None, help="ember LM head quantization (default: auto)")
        sub.add_argument(
            "--kv-cache-dtype", default=None, help="ember KV cache storage: auto, int8, fp8_e4m3 (default: auto)"
        )
        sub.add_argument(
            "--text", default="ptb-test", help="ptb-test, ptb-valid, ptb-train or a UTF-8 file (default: ptb-test)"
        )
        sub.add_argument("--ctx", type=int, default=512, help="model positions per window, BOS included (default: 512)")
        sub.add_argument(
            "--stride", type=int, default=None, help="text tokens between window starts (default: half a window)"
        )
        sub.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (default: all)")
        sub.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
        sub.add_argument("--verbose", action="store_true", help="log engine details to stderr")
    ppl.add_argument(
        "--engine", choices=("ember", "llama.cpp"), default="ember",
        help="ember, or llama.cpp via llama-cpp-python on a GGUF fed ember's token ids (default: ember)",
    )
    kld.add_argument("--reference", default=None, help="reference model (GGUF/HF folder) or a file from --save-reference")
    kld.add_argument(
        "--reference-engine", choices=("ember", "llama.cpp"), default="ember",
        help="engine running a reference model (default: ember)",
    )
    kld.add_argument("--reference-dtype", default=None, help="dtype of a reference model (default: --dtype)")
    kld.add_argument(
        "--reference-quantization", default=None, help="ember quantization of a reference model (default: auto)"
    )
    kld.add_argument(
        "--save-reference", default=None, metavar="FILE", help="save --model's top-K log-probs as a reference and exit"
    )
    kld.add_argument("--top-k", type=int, default=64, help="log-probs kept per position by --save-reference (default: 64)")
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    if args.eval_command == "perplexity":
        _run_perplexity(args)
    else:
        _run_kld(args)


def _engine_args(args: argparse.Namespace) -> dict[str, Any]:
    settings = {
        "quantization": args.quantization, "lm_head_quantization": args.lm_head_quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    return {name: value for name, value in settings.items() if value is not None}


def _plan(args: argparse.Namespace, scorer: Scorer) -> WindowPlan:
    if args.ctx < 2:
        raise InvalidRequestError(f"--ctx must be at least 2, got {args.ctx}")
    tokens = tokenize_text(scorer.tokenizer, load_text(args.text))
    bos = scorer.tokenizer.bos_token_id if uses_bos(scorer.tokenizer) else None
    return WindowPlan.build(tokens, bos, args.ctx, args.stride, args.max_tokens)


def _emit(result: dict, path: str | None, lines: list[str]) -> None:
    print("\n".join(lines))
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def _run_perplexity(args: argparse.Namespace) -> None:
    from ember.eval.perplexity import perplexity

    scorer = make_scorer(args.engine, args.model, args.ctx, args.dtype, **_engine_args(args))
    plan = _plan(args, scorer)
    result = perplexity(scorer, plan, progress=not args.no_progress)
    record = {"model": args.model, "text": args.text, "dtype": args.dtype, **result.to_dict()}
    _emit(record, args.json, [
        f"perplexity ({result.engine}): {result.ppl:.4f}  (per token; {result.num_tokens} of {result.text_tokens} "
        f"tokens, ctx {result.ctx}, stride {result.stride}, {result.windows} windows, BOS {'on' if result.bos else 'off'}, "
        f"{result.seconds:.1f} s)",
    ])


def _run_kld(args: argparse.Namespace) -> None:
    from ember.eval.kld import kld_live, kld_saved, save_reference

    if args.save_reference:
        scorer = make_scorer("ember", args.model, args.ctx, args.dtype, **_engine_args(args))
        plan = _plan(args, scorer)
        ppl = save_reference(scorer, plan, args.save_reference, args.top_k, progress=not args.no_progress)
        print(f"saved reference ({plan.num_targets} positions, top-{args.top_k}) to {args.save_reference}; ppl {ppl:.4f}")
        return
    if args.reference is None:
        raise InvalidRequestError("kld needs --reference (a model or a saved file) or --save-reference FILE")
    if _is_saved_reference(args.reference):
        scorer = make_scorer("ember", args.model, _saved_ctx(args.reference), args.dtype, **_engine_args(args))
        result = kld_saved(scorer, args.reference, args.max_tokens, progress=not args.no_progress)
    else:
        scorer = make_scorer("ember", args.model, args.ctx, args.dtype, **_engine_args(args))
        extra = {} if args.reference_quantization is None else {"quantization": args.reference_quantization}
        reference = make_scorer(
            args.reference_engine, args.reference, args.ctx, args.reference_dtype or args.dtype, **extra
        )
        result = kld_live(scorer, reference, _plan(args, scorer), progress=not args.no_progress)
    record = {"model": args.model, "reference": args.reference, "text": args.text, **result.to_dict()}
    bound = "" if result.exact else f" (top-{result.top_k} bucket lower bound; mean tail mass {result.mean_tail_mass:.2e})"
    _emit(record, args.json, [
        f"KLD mean {result.mean_kld:.6f}  median {result.median_kld:.6f}  p99 {result.p99_kld:.6f}  "
        f"max {result.max_kld:.4f}{bound}",
        f"top-1 agreement {100 * result.top1_agreement:.2f}%",
        f"ppl model {result.ppl_model:.4f}  reference {result.ppl_reference:.4f}  delta {result.delta_ppl_pct:+.3f}%  "
        f"({result.num_tokens} tokens, ctx {result.ctx}, stride {result.stride}, {result.seconds:.1f} s)",
    ])


def _is_saved_reference(path: str) -> bool:
    import os
    import zipfile

    # A model is a .gguf file or a folder; torch.save writes a zip archive.
    return os.path.isfile(path) and not path.endswith(".gguf") and zipfile.is_zipfile(path)


def _saved_ctx(path: str) -> int:
    from ember.eval.kld import load_reference

    return load_reference(path)[0].ctx


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m ember.eval.cli perplexity ...`), same flags as `ember eval`."""
    parser = argparse.ArgumentParser(prog="ember")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    args.handler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
