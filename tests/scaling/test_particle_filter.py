"""Particle filtering and the engine's step search under it: steps end at the boundary, forks share blocks,
pruned sequences free theirs at once, resampling follows the weights, and nothing leaks."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest

from ember import SamplingParams, StepBoundary
from ember.errors import InvalidRequestError
from ember.scaling import particle_filter
from helpers import assert_no_leak

TWO_TOKENS = StepBoundary(delimiter=None, max_tokens=2)


@pytest.fixture(scope="module")
def long_params() -> SamplingParams:
    """No early stops: every particle runs max_tokens, so every round has the whole population live."""
    return SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)


def _blocks_in_use(engine) -> int:  # noqa: ANN001 - an LLMEngine
    return engine.kv_manager.num_total_blocks - engine.kv_manager.num_free_blocks


def _run_until_ready(engine, request_id: str):  # noqa: ANN001, ANN202
    state = engine.step_search_state(request_id)
    while not state.ready:
        engine.step()
        state = engine.step_search_state(request_id)
    return state


def test_steps_end_at_the_delimiter(llm, prompt, long_params):
    engine = llm.engine
    # Member 0 samples with seed params.seed + 0: the same tokens as a plain request with that seed.
    [reference] = llm.generate(prompt, long_params, use_tqdm=False)
    tokenizer = engine.tokenizer
    ids = reference.outputs[0].token_ids
    texts = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    cut = next(k for k in range(3, len(ids)) if len(texts[k]) > len(texts[k - 1]))
    delimiter = texts[cut][len(texts[cut - 1]) :]  # what the cut-th token adds to the text
    expected = next(k for k in range(1, len(ids) + 1) if delimiter in texts[k])
    engine.add_step_search("delim", prompt, long_params, 1, StepBoundary(delimiter=delimiter))
    state = _run_until_ready(engine, "delim")
    [(member_id, partial)] = state.parked.items()
    assert partial.token_ids == ids[:expected] and delimiter in partial.text
    engine.abort_request("delim")
    assert_no_leak(engine)


def test_forks_share_blocks_and_pruned_sequences_free_theirs_at_once(llm, prompt, long_params):
    engine = llm.engine
    block_size = engine.kv_manager.block_size
    params = replace(long_params, max_tokens=5 * block_size)
    # One sequence, whose first step spans two full blocks and part of a third.
    engine.add_step_search("forks", prompt, params, 1, StepBoundary(delimiter=None, max_tokens=2 * block_size + 3))
    state = _run_until_ready(engine, "forks")
    [first] = state.parked
    alone = _blocks_in_use(engine)
    going_on = engine.advance_step_search("forks", {first: 4})
    assert going_on[first][0] == first and len(going_on[first]) == 4
    # Three forks: every full block is shared; each fork copies only the partly filled one.
    assert _blocks_in_use(engine) == alone + 3
    state = _run_until_ready(engine, "forks")
    assert sorted(state.parked) == sorted(going_on[first])
    texts = {tuple(p.token_ids) for p in state.parked.values()}
    assert len(texts) == 4  # each fork samples with its own seed: four different continuations
    before = _blocks_in_use(engine)
    pruned = going_on[first][1:3]
    engine.advance_step_search("forks", {pruned[0]: 0, pruned[1]: 0})
    freed = before - _blocks_in_use(engine)
    assert freed >= 2  # each pruned fork's own blocks are back before any further step
    state = engine.step_search_state("forks")
    assert set(state.parked) == set(going_on[first]) - set(pruned) and state.ready
    engine.abort_request("forks")  # mid-search
    assert_no_leak(engine)


def test_bad_step_search_requests_are_refused(llm, prompt, long_params):
    engine = llm.engine
    with pytest.raises(InvalidRequestError, match="num_sequences"):
        engine.add_step_search("bad", prompt, long_params, 0, TWO_TOKENS)
    with pytest.raises(InvalidRequestError, match="n at 1"):
        engine.add_step_search("bad", prompt, replace(long_params, n=2), 2, TWO_TOKENS)
    with pytest.raises(ValueError, match="delimiter or max_tokens"):
        StepBoundary(delimiter=None)
    engine.add_step_search("bad", prompt, long_params, 2, TWO_TOKENS)
    state = _run_until_ready(engine, "bad")
    member = next(iter(state.parked))
    with pytest.raises(InvalidRequestError, match="not a parked member"):
        engine.advance_step_search("bad", {"nobody": 1})
    with pytest.raises(InvalidRequestError, match=">= 0"):
        engine.advance_step_search("bad", {member: -1})
    with pytest.raises(InvalidRequestError, match="no step search"):
        engine.step_search_state("missing")
    engine.abort_request("bad")
    for bad in ({"n": 0}, {"temperature": 0.0}, {"max_steps": -1}):
        with pytest.raises(InvalidRequestError):
            particle_filter(llm, prompt, **{"n": 2, **bad})
    assert_no_leak(engine)


def test_resampling_frequencies_follow_the_weights(llm, prompt, long_params):
    """One round, repeated with 40 draw seeds over the same population (the sampling seed is fixed): the
    draws per score class match softmax(score / temperature) by a chi-square test."""
    n, temperature = 32, 0.7
    draws: Counter[float] = Counter()
    expected: Counter[float] = Counter()
    for seed in range(40):
        calls: list[float] = []

        def scorer(prompt_text: str, completion) -> float:  # noqa: ANN001
            score = float(completion.token_ids[0] % 4)
            calls.append(score)
            return score

        result = particle_filter(llm, prompt, n, long_params, scorer, TWO_TOKENS, temperature, seed, max_steps=1)
        scores = calls[:n]  # the first round scores the whole population, in population order
        total = sum(math.exp(s / temperature) for s in scores)
        for s in scores:
            expected[s] += n * math.exp(s / temperature) / total
        draws.update(scores[i] for i in result.resampled[0])
    assert len(expected) >= 3  # the population has several score classes
    chi_square = sum((draws[c] - e) ** 2 / e for c, e in expected.items())
    assert chi_square < 16.3, (draws, expected)  # p = 0.001 with 3 degrees of freedom
    # The weights matter (a uniform draw would fail this too).
    assert draws[max(expected)] > 1.5 * draws[min(expected)]
    assert_no_leak(llm.engine)


def test_a_scripted_scorer_steers_the_search_and_seeds_repeat_it(llm, prompt, long_params):
    # Scores that differ between partial answers, and a very low temperature: every draw takes the best.
    def scorer(prompt_text: str, completion) -> float:  # noqa: ANN001
        return sum((i + 1) * t for i, t in enumerate(completion.token_ids)) % 1009 / 10

    result = particle_filter(llm, prompt, 6, long_params, scorer, TWO_TOKENS, temperature=1e-3, seed=3)
    assert result.num_steps == 3  # 8 tokens in steps of 2: a round after steps 1-3; step 4 finishes them all
    assert all(len(set(round)) == 1 for round in result.resampled)
    assert result.score == max(result.scores) == scorer(prompt, result.best)
    assert [len(p.token_ids) for p in result.particles] == [8] * 6
    acc = result.accounting
    assert acc.num_samples == 6 and acc.num_finished == 6 and acc.scorer_calls == 6 * 3 + 6
    # Six sequences per step, each sampling two tokens: 4 steps x 6 x 2; pruned ones sampled theirs too.
    assert acc.generated_tokens == 4 * 6 * 2 and acc.aborted_tokens > 0
    again = particle_filter(llm, prompt, 6, long_params, scorer, TWO_TOKENS, temperature=1e-3, seed=3)
    assert again.resampled == result.resampled
    assert [p.token_ids for p in again.particles] == [p.token_ids for p in result.particles]
    other = particle_filter(llm, prompt, 6, replace(long_params, seed=6), scorer, TWO_TOKENS, temperature=1e-3, seed=3)
    assert [p.token_ids for p in other.particles] != [p.token_ids for p in result.particles]
    assert_no_leak(llm.engine)


def test_finished_particles_are_kept_and_copied(llm, prompt, params):
    """With stop tokens some particles finish early; they keep their score and can be drawn again."""
    result = particle_filter(llm, prompt, 8, params, boundary=TWO_TOKENS, seed=0)
    assert all(p.finish_reason in ("stop", "length") for p in result.particles)
    assert len(result.particles) == 8 and result.best in result.particles
    lengths = {len(p.token_ids) for p in result.particles}
    assert min(lengths) < params.max_tokens  # some finished on a stop token
    assert_no_leak(llm.engine)
