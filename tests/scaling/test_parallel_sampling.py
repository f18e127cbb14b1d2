"""N samples in one request, early stops that abort the rest within the step, and what the accounting says."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from ember.errors import InvalidRequestError
from ember.scaling import FIRST_FINISH, EarlyStop, sample
from helpers import assert_no_leak


def _lengths(samples) -> list[int]:
    return [len(c.token_ids) for c in samples.completions]


@pytest.fixture(scope="module")
def full(llm, prompt, params):
    """Six samples run to the end: what the early stops are checked against."""
    return sample(llm, prompt, 6, params)


def test_n_samples_in_one_request_and_accounting_adds_up(llm, prompt, full):
    samples = full
    acc = samples.accounting
    assert [c.index for c in samples.completions] == list(range(6))
    assert samples.candidates == samples.completions
    assert acc.num_samples == acc.num_finished == 6 and acc.num_aborted == acc.aborted_tokens == 0
    assert acc.generated_tokens == sum(_lengths(samples))
    assert acc.prompt_tokens == len(llm.get_tokenizer().encode(prompt)) == len(samples.prompt_token_ids)
    assert acc.lookup_tokens == acc.prompt_tokens  # one lookup: the siblings fork off the first sequence
    assert acc.computed_prompt_tokens == acc.lookup_tokens - acc.cached_tokens
    assert acc.engine_steps == max(_lengths(samples))  # the prompt fits one step, then one token a step
    assert acc.peak_kv_blocks >= 6  # a block each at least: the prompt's partly filled block is copied per fork
    assert acc.scorer_calls == 0 and acc.wall_seconds == acc.sampling_seconds > 0
    assert samples.prompt == prompt
    assert_no_leak(llm.engine)


def test_cumulative_logprob_filled_without_asking_for_logprobs(llm, prompt, params):
    assert params.logprobs is None
    samples = sample(llm, prompt, 3, params)
    for c in samples.completions:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)))
        assert math.isfinite(c.cumulative_logprob) and c.cumulative_logprob < 0


def test_first_finish_aborts_the_siblings_within_one_step(llm, prompt, params, full):
    lengths = _lengths(full)
    shortest = min(lengths)
    assert 1 < shortest < max(lengths) and lengths.count(shortest) == 1  # the seed gives a real race
    early = sample(llm, prompt, 6, params, early_stop=FIRST_FINISH)
    acc = early.accounting
    # Stopped in the step the first sample finished: every sibling has exactly as many tokens, and its tokens
    # are the start of what it samples when run to the end (same seeds, same batch up to here).
    assert acc.engine_steps == shortest
    assert _lengths(early) == [shortest] * 6
    for cut, whole in zip(early.completions, full.completions):
        assert cut.token_ids == whole.token_ids[:shortest]
    [winner] = early.candidates
    assert winner.index == lengths.index(shortest) and winner.finish_reason == "stop"
    assert [c.finish_reason for c in early.completions].count("abort") == 5
    assert acc.num_finished == 1 and acc.num_aborted == 5
    assert acc.generated_tokens == 6 * shortest and acc.aborted_tokens == 5 * shortest
    assert acc.generated_tokens < full.accounting.generated_tokens
    kv = llm.engine.kv_manager
    assert kv.num_free_blocks == kv.num_total_blocks  # back before any further step
    assert_no_leak(llm.engine)


def test_short_m_at_k_stops_after_m_finish(llm, prompt, params, full):
    order = sorted(full.completions, key=lambda c: (len(c.token_ids), c.index))
    third = len(order[2].token_ids)
    assert len(order[3].token_ids) > third  # the seed gives three finishers before the rest
    early = sample(llm, prompt, 6, params, early_stop=EarlyStop(3))
    assert early.accounting.engine_steps == third
    assert [c.index for c in early.candidates] == [c.index for c in order[:3]]
    assert all(c.finish_reason == "stop" for c in early.candidates)
    assert early.accounting.num_finished == 3 and early.accounting.num_aborted == 3
    assert early.accounting.generated_tokens == sum(_lengths(early))
    assert early.accounting.aborted_tokens == 3 * third
    assert_no_leak(llm.engine)


def test_k_equal_m_runs_to_the_end(llm, prompt, params):
    samples = sample(llm, prompt, 3, params, early_stop=EarlyStop(3))
    assert samples.accounting.num_aborted == 0 and len(samples.candidates) == 3
    assert_no_leak(llm.engine)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda llm, p, sp: sample(llm, p, 0, sp), "positive integer"),
        (lambda llm, p, sp: sample(llm, p, 2.0, sp), "positive integer"),
        (lambda llm, p, sp: sample(llm, p, 3, sp, early_stop=EarlyStop(4)), r"m \(4\) must not exceed"),
        (lambda llm, p, sp: sample(llm, p, 3, replace(sp, n=2)), "leave n at 1"),
        (lambda llm, p, sp: EarlyStop(0), "positive integer"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(llm, prompt, params, call, message):
    with pytest.raises(InvalidRequestError, match=message):
        call(llm, prompt, params)
    assert_no_leak(llm.engine)


def test_busy_engine_is_refused(llm, prompt, params):
    llm.engine.add_request("other", prompt, params)
    try:
        with pytest.raises(InvalidRequestError, match="idle engine"):
            sample(llm, prompt, 2, params)
    finally:
        llm.engine.abort_request("other")
    assert_no_leak(llm.engine)
