"""Token-DiFR on the default model: how fast ember verifies, and how soon it tells configurations apart.

    python bench/bench_verify.py                    # 16 prompts x 256 tokens per configuration
    python bench/bench_verify.py --claims 8 --tokens 128

The reference is the default model as ember runs it by default (GGUF blocks kept quantized). Claims are
sampled (temperature 1, top-p 0.95, seeded) by: the reference configuration itself (honest), the model
re-quantized to int4 RTN, the reference with an int8 KV cache, and the reference at temperature 0.8 — every
one claimed as the reference's temperature 1.0. Per configuration: exact-match rate, mean margin, and the ROC
AUC of each claim's divergence (mean clipped margin over its first T tokens) against the honest claims.
"""

from __future__ import annotations

import argparse
import os
import time

import ember  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from ember import LLM, SamplingParams
from ember.verify import Claim, TokenVerifier, roc_auc

PROMPTS = [
    "The history of the printing press", "Write a short poem about the sea.", "def quicksort(xs):",
    "The three laws of thermodynamics are", "Once upon a time in a small village", "How do vaccines work?",
    "A recipe for bread:", "The stock market today", "Explain recursion to a child.", "import numpy as np\n",
    "Dear hiring manager,", "The best hiking trails in", "In 1969, the first", "List five prime numbers:",
    "The rules of chess", "My favourite book is",
]


def _claims(llm: LLM, prompts: list[str], params: SamplingParams, claimed: SamplingParams) -> tuple[list[Claim], float]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    claims = [Claim(o.prompt_token_ids, c.token_ids, claimed, c.seed) for o in outputs for c in o.outputs]
    return claims, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, default=16, help="claims per configuration (default: 16)")
    parser.add_argument("--tokens", type=int, default=256, help="output tokens per claim (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="claims verified together (default: 8)")
    args = parser.parse_args()
    prompts = (PROMPTS * (1 + args.claims // len(PROMPTS)))[: args.claims]
    base = dict(kv_cache_memory=1.0, max_num_seqs=16)
    claimed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=args.tokens, seed=1234, ignore_eos=True)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.claims} claims x {args.tokens} tokens per configuration")

    reference = LLM(**base)
    verifier = TokenVerifier(reference.engine, args.batch_size)
    sets: dict[str, list[Claim]] = {}
    sets["honest"], seconds = _claims(reference, prompts, claimed, claimed)
    print(f"generated honest claims in {seconds:.1f} s")
    cooler = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.tokens, seed=1234, ignore_eos=True)
    sets["temperature 0.8"], _ = _claims(reference, prompts, cooler, claimed)
    for name, settings in (("int4 RTN weights", {"quantization": "int4"}), ("int8 KV cache", {"kv_cache_dtype": "int8"})):
        other = LLM(**base, **settings)
        sets[name], _ = _claims(other, prompts, claimed, claimed)
        del other

    horizons = [t for t in (8, 16, 32, 64, 128, 256, 512) if t <= args.tokens]
    results = {}
    for name, claims in sets.items():
        report = verifier.verify_all(claims, progress=True)
        results[name] = report
    honest = results["honest"].claims
    print()
    print("| claims from | exact match | mean margin | impossible | verify tok/s | "
          + " | ".join(f"AUC@{t}" for t in horizons) + " |")  # fmt: skip
    print("|---|---:|---:|---:|---:|" + "---:|" * len(horizons))
    for name, report in results.items():
        a = report.aggregate
        aucs = ["" if name == "honest" else f"{roc_auc([c.divergence(t) for c in honest], [c.divergence(t) for c in report.claims]):.3f}"
                for t in horizons]  # fmt: skip
        print(f"| {name} | {a['exact_match_rate']:.4f} | {a['mean_margin']:.5f} | {a['impossible_rate']:.4f} | "
              f"{a['tokens_per_second']:.1f} | " + " | ".join(aucs) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
