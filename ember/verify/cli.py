"""`ember verify`: Token-DiFR scores of claimed outputs (a JSONL file) against this model and configuration."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from ember.config import EngineConfig
from ember.errors import EmberError


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--claims", required=True, help="JSONL file, one claim a line (docs/verification.md)")
    parser.add_argument("--json", default=None, metavar="OUT",
                        help="write the aggregate and one record per claim to this file")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="claims teacher-forced together (default: 8)")
    parser.add_argument("--verbose", action="store_true", help="log engine details to stderr")


def run_verify(config: EngineConfig, args: argparse.Namespace) -> None:
    from ember.engine.llm_engine import LLMEngine
    from ember.verify import TokenVerifier, load_claims

    engine = LLMEngine(config)
    claims = load_claims(args.claims, engine.model_config.vocab_size)  # every line checked before any work
    report = TokenVerifier(engine, args.batch_size).verify_all(claims, progress=True)
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report.to_dict(), f, indent=2)
        except OSError as e:
            raise EmberError(f"cannot write {args.json!r}: {e.strerror}") from e
    print(_table(report.aggregate, [(c.claim_id, c) for c in report.claims]))


def _table(aggregate: dict[str, Any], claims: list[tuple[str | None, Any]]) -> str:
    lines = [f"{'claim':<12} {'tokens':>7} {'exact':>7} {'margin':>9} {'impossible':>10}"]
    for number, (claim_id, c) in enumerate(claims, 1):
        lines.append(f"{claim_id or number!s:<12} {c.num_tokens:>7} {c.exact_match_rate:>7.3f} {c.mean_margin:>9.5f} "
                     f"{c.impossible_rate:>10.3f}")  # fmt: skip
    a = aggregate
    margin = a["mean_margin"] if math.isfinite(a["mean_margin"]) else float("nan")
    lines.append(f"{'all':<12} {a['num_tokens']:>7} {a['exact_match_rate']:>7.3f} {margin:>9.5f} "
                 f"{a['impossible_rate']:>10.3f}   ({a['tokens_per_second']:.1f} tokens/s)")  # fmt: skip
    return "\n".join(lines)
