"""Continuous batching over the paged KV cache: batch invariance, prefix caching, preemption, sliding
windows and parallel sampling, each on a tiny random checkpoint in float32 and checked for block leaks."""

from __future__ import annotations

import pytest
import torch
import transformers

from ember import LLM, SamplingParams
from ember.engine.block_manager import NULL_BLOCK
from ember.errors import InvalidRequestError
from helpers import assert_no_leak

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _prompts(count: int, seed: int = 0, low: int = 1, high: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(4, 500, (n,), generator=g).tolist() for n in lengths]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llama(checkpoint_dir):
    return checkpoint_dir("llama")


def test_batch_invariance_with_chunked_prefill(llama):
    prompts = _prompts(16)
    alone_llm = LLM(llama, dtype="float32", block_size=4)
    alone = [_tokens(alone_llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    # A small token budget splits prompts into chunks that share steps with other requests' decodes.
    llm = LLM(llama, dtype="float32", block_size=4, max_num_batched_tokens=24)
    together = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert together == alone
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: a sliding-window group besides the full one
def test_prefix_cache_hit_gives_the_same_output(checkpoint_dir, family):
    folder = checkpoint_dir(family)
    shared = _prompts(1, seed=5, low=50, high=51)[0]
    prompts = [shared + tail for tail in ([7, 8, 9], [10, 11], [12])]
    cold = LLM(folder, dtype="float32", block_size=4, enable_prefix_caching=False)
    expected = _tokens(cold.generate(prompts, GREEDY, use_tqdm=False))
    warm = LLM(folder, dtype="float32", block_size=4)
    warm.generate([shared], GREEDY, use_tqdm=False)
    stats = warm.engine.kv_manager.stats
    hits_before = stats.hits
    got = [_tokens(warm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    assert got == expected
    assert stats.hits - hits_before >= 3 * 48  # each reused the 12 full blocks of the shared prefix
    assert_no_leak(warm.engine)


def test_preemption_under_a_tiny_pool_gives_the_same_outputs(llama):
    prompts = _prompts(8, seed=2, low=10, high=30)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = _tokens(LLM(llama, dtype="float32", block_size=4).generate(prompts, params, use_tqdm=False))
    tiny = LLM(llama, dtype="float32", block_size=4, kv_cache_tokens=64)
    got = _tokens(tiny.generate(prompts, params, use_tqdm=False))
    assert got == expected
    assert tiny.engine.scheduler.num_preemptions > 0
    assert_no_leak(tiny.engine)


def test_impossible_request_is_rejected_at_admission(llama):
    tiny = LLM(llama, dtype="float32", block_size=4, kv_cache_tokens=64)
    with pytest.raises(InvalidRequestError, match="cache holds only 64"):
        tiny.generate([[5] * 40], SamplingParams(max_tokens=40), use_tqdm=False)
    assert_no_leak(tiny.engine)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_sliding_window_long_context_matches_transformers(checkpoint_dir, family):
    folder = checkpoint_dir(family)  # windows of 8 (Gemma 3, every other layer) and 12 (Mistral, all)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(folder, dtype="float32", block_size=4, max_num_batched_tokens=16)
    prompts = _prompts(3, seed=4, low=30, high=50)
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    dropped_blocks = False
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        windowed = [m for m in engine.kv_manager.managers if m.window is not None]
        dropped_blocks |= any(NULL_BLOCK in t.block_ids for m in windowed for t in m.tables.values())
    assert dropped_blocks  # blocks out of the window were released while running
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert outputs[str(i)] == expected
    assert_no_leak(engine)


def test_parallel_sampling_forks_and_matches_separate_seeds(llama):
    llm = LLM(llama, dtype="float32", block_size=4)
    prompt = _prompts(1, seed=9, low=22, high=23)[0]  # 22 tokens: a partly filled last block to copy
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    engine = llm.engine
    engine.add_request("p", prompt, params)
    engine.step()  # prefill, then the siblings fork off
    parent, *children = engine.output_processor.requests["p"]  # noqa: SLF001
    shared = engine.kv_manager.managers[0].block_ids(children[0].request_id)[0]
    assert shared == engine.kv_manager.managers[0].block_ids(parent.request_id)[0]
    assert engine.kv_manager.managers[0].blocks[shared].ref_count == 3
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    separate = [
        _tokens(llm.generate([prompt], SamplingParams(temperature=1.0, seed=5 + i, max_tokens=12, ignore_eos=True), use_tqdm=False))[0]
        for i in range(3)
    ]
    assert [c.token_ids for c in final.outputs] == separate
    assert_no_leak(engine)


def test_abort_mid_prefill_and_mid_decode_returns_blocks(llama):
    llm = LLM(llama, dtype="float32", block_size=4, max_num_batched_tokens=8)
    engine = llm.engine
    for i, prompt in enumerate(_prompts(6, seed=11, low=20, high=40)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=30, n=1 + i % 2, seed=i))
    for _ in range(6):
        engine.step()
    for i in range(0, 6, 2):
        engine.abort_request(str(i))
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leak(engine)
