"""Batch invariance on the real default model (Gemma 3 270M Q4_K_M GGUF), on every default path: a request's
logits are bitwise equal alone and inside mixed batches of 1-16 requests, with prompt chunks of 16/64/256
tokens, with a prefix-cache miss and hit, and with speculative decoding on and off; for the GGUF kept
quantized, bf16 (the GGUF dequantized), int4 RTN weights and an int8 KV cache. The logits are those the
sampler receives, recorded per request and per history of generated tokens (a speculative step's rows for
drafts that turn out right have the same history as a one-token step's row)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from ember import LLM, SamplingParams
from ember.worker.logits_processors import LogitsProcessor, LogitsRow

from helpers import assert_no_leak

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=5, ignore_eos=True)

CONFIGS = {
    "gguf": {},
    "bf16": {"quantization": "none"},
    "int4": {"quantization": "int4"},
    "int8-kv": {"kv_cache_dtype": "int8"},
}


class LogitsRecorder(LogitsProcessor):
    """Keeps every logits row it sees, keyed by (request id, the tokens generated before it)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, tuple[int, ...]], list[torch.Tensor]] = defaultdict(list)

    def apply(self, logits: torch.Tensor, rows: list[LogitsRow]) -> torch.Tensor:
        for i, row in enumerate(rows):
            self.rows[(row.request_id, tuple(row.output_token_ids))].append(logits[i].clone())
        return logits


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[torch.Tensor]]:
    """Each prompt's logits at each generated position, in prompt order."""
    recorder = LogitsRecorder()
    processors = llm.engine.runner.sampler.processors
    processors.insert(0, recorder)  # first: the raw logits, before any processor changes them
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        processors.remove(recorder)
    result = []
    for output in outputs:
        tokens = output.outputs[0].token_ids
        positions = []
        for j in range(len(tokens)):
            seen = recorder.rows[(output.request_id, tuple(tokens[:j]))]
            assert all(torch.equal(seen[0], again) for again in seen[1:])  # recomputed rows agree too
            positions.append(seen[0])
        result.append(positions)
    return result


def _assert_bitwise_equal(got: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(expected), what
    for j, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"{what}: position {j} differs by up to {float((a - b).abs().max()):.3g}"


def _prompts() -> tuple[list[list[int]], list[list[int]]]:
    """Three target prompts (a repeated phrase in each, so n-gram lookup has drafts to propose) and 15 others."""
    g = torch.Generator().manual_seed(0)

    def random_tokens(n: int) -> list[int]:
        return torch.randint(100, 20000, (n,), generator=g).tolist()

    targets = []
    for length in (37, 90, 141):
        phrase = random_tokens(12)
        targets.append(random_tokens(length) + phrase + random_tokens(9) + phrase[:6])
    others = [random_tokens(int(n)) for n in torch.randint(3, 120, (15,), generator=g)]
    return targets, others


@pytest.fixture(scope="module")
def prompts() -> tuple[list[list[int]], list[list[int]]]:
    return _prompts()


# Seeded sampling only changes which tokens follow (the logits are the model's either way): checked on the two
# default dtypes' paths, greedy on all four.
CASES = [(name, GREEDY) for name in CONFIGS] + [("gguf", SEEDED), ("bf16", SEEDED)]


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}-{'seeded' if p.temperature else 'greedy'}" for n, p in CASES])
def test_logits_are_bitwise_equal_in_any_batch_chunking_cache_state_and_with_speculation(name, params, prompts):
    targets, others = prompts
    settings = CONFIGS[name]
    llm = LLM(enable_prefix_caching=False, max_model_len=1024, **settings)
    alone = [_run(llm, [t], params)[0] for t in targets]  # the whole prompt in one chunk
    for chunk, batch in [(16, 5), (64, 16), (256, 9)]:
        llm.engine.scheduler.max_num_batched_tokens = chunk
        mixed = others[: batch - len(targets)] + targets
        # Targets at the end and in the middle, so their rows sit at different offsets of each step.
        mixed = mixed[::2] + mixed[1::2]
        got = _run(llm, mixed, params)
        for target, expected in zip(targets, alone):
            _assert_bitwise_equal(got[mixed.index(target)], expected, f"{name}: batch {batch}, chunks of {chunk}")
    assert_no_leak(llm.engine)
    del llm

    speculative = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
    cached = LLM(max_model_len=1024, speculative_config=speculative, max_num_batched_tokens=64, **settings)
    miss = _run(cached, targets, params)
    hits_before = cached.engine.kv_manager.stats.hits
    hit = _run(cached, others[:4] + targets[::-1], params)[4:][::-1]
    assert cached.engine.kv_manager.stats.hits > hits_before
    if params is GREEDY:  # the model copies the repeated phrase; a sampled token may leave it (no drafts)
        assert cached.engine.scheduler.spec_stats.num_draft_tokens > 0
    for target, expected, a, b in zip(targets, alone, miss, hit):
        _assert_bitwise_equal(a, expected, f"{name}: speculation on, prefix miss")
        _assert_bitwise_equal(b, expected, f"{name}: speculation on, prefix hit")
    assert_no_leak(cached.engine)
