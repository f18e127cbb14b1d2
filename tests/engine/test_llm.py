"""The offline API on a tiny random checkpoint: outputs, sampling semantics, stops, logprobs, errors."""

from __future__ import annotations

import math

import pytest
import torch

from ember import LLM, SamplingParams
from ember.errors import InvalidRequestError
from helpers import assert_no_leak

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    return LLM(checkpoint_dir("llama"), dtype="float32", max_model_len=128)


def _random_prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 500, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (count,), generator=g)]


def test_output_shape(llm):
    [out] = llm.generate("The quick brown fox", GREEDY, use_tqdm=False)
    assert out.prompt == "The quick brown fox"
    assert out.prompt_token_ids == llm.get_tokenizer().encode("The quick brown fox")
    assert out.finished
    [completion] = out.outputs
    assert completion.index == 0 and completion.finish_reason == "length"
    assert len(completion.token_ids) == 12
    assert completion.text == llm.get_tokenizer().decode(completion.token_ids)


def test_batch_gives_same_tokens_as_alone(llm):
    prompts = _random_prompts(8)
    together = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, together):
        [alone] = llm.generate([prompt], GREEDY, use_tqdm=False)
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids


def test_seed_reproduces_and_is_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    prompts = _random_prompts(4, seed=3)
    [alone] = llm.generate([prompts[0]], params, use_tqdm=False)
    batched = llm.generate(prompts, [params] + [SamplingParams(temperature=1.0, max_tokens=20)] * 3, use_tqdm=False)
    assert batched[0].outputs[0].token_ids == alone.outputs[0].token_ids
    other = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    [different] = llm.generate([prompts[0]], other, use_tqdm=False)
    assert different.outputs[0].token_ids != alone.outputs[0].token_ids


def test_n_completions(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    [out] = llm.generate("Hello world", params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_max_tokens_and_context_limit(llm):
    [out] = llm.generate([[5] * 120], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 8 and out.outputs[0].finish_reason == "length"
    [out] = llm.generate([[5] * 120], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 128 - 120 and out.outputs[0].finish_reason == "length"
    with pytest.raises(InvalidRequestError, match="exceeds the context limit"):
        llm.generate([[5] * 120], SamplingParams(max_tokens=50), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_stop_token_ids_and_eos(llm):
    [ref] = llm.generate("Hello world", GREEDY, use_tqdm=False)
    stop_token = ref.outputs[0].token_ids[5]
    first = ref.outputs[0].token_ids.index(stop_token)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_token])
    [out] = llm.generate("Hello world", params, use_tqdm=False)
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_token
    eos = llm.engine.eos_token_ids[0]
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=4, stop_token_ids=[stop_token])
    [out] = llm.generate("Hello world", params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) >= 4 and eos not in out.outputs[0].token_ids[:4]


def test_stop_string(llm):
    [ref] = llm.generate("Hello world", GREEDY, use_tqdm=False)
    text = ref.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text.index(stop)
    [out] = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]), use_tqdm=False)
    assert out.outputs[0].text == text[:cut] and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    [out] = llm.generate("Hello world", params, use_tqdm=False)
    assert out.outputs[0].text == text[: cut + len(stop)]


def test_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    [out] = llm.generate("The quick brown fox", params, use_tqdm=False)
    completion = out.outputs[0]
    assert len(completion.logprobs) == 6
    total = 0.0
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3
        total += entry[token].logprob
    assert math.isclose(completion.cumulative_logprob, total, rel_tol=1e-5)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token in entry and entry[token].logprob <= 0


def test_streaming_deltas_add_up(llm):
    engine = llm.engine
    engine.add_request("s", "The quick brown fox", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=["zz"]))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.outputs[0].delta_text)
            final = out
    assert "".join(pieces) == final.outputs[0].text


def test_chat(llm):
    messages = [{"role": "user", "content": "Hello"}]
    [out] = llm.chat(messages, GREEDY, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    expected = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert out.prompt_token_ids == expected


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("a", "Hello", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv_manager.num_free_blocks < engine.kv_manager.num_total_blocks
    engine.abort_request("a")
    assert_no_leak(engine)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([7] * 128, "context limit"),
        ("", "prompt is empty"),
        ([1, 2, 100000], "token ids must be integers"),
    ],
)
def test_bad_prompts_leave_no_state(llm, prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate(["fine prompt", prompt], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
