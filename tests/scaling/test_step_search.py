"""Step beam search and best-first (A*-style) search over steps: which sequences they keep and expand, what
they count, and no blocks left behind, also when a scorer fails mid-search."""

from __future__ import annotations

import pytest

from ember import SamplingParams, StepBoundary
from ember.errors import InvalidRequestError
from ember.scaling import ScorerError, best_first_search, step_beam_search
from helpers import assert_no_leak

TWO_TOKENS = StepBoundary(delimiter=None, max_tokens=2)


@pytest.fixture(scope="module")
def long_params() -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)


class Recorder:
    """A scripted process scorer (a hash of the tokens: partial answers score differently) that records
    what it scored, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], float]] = []

    def __call__(self, prompt: str, completion) -> float:  # noqa: ANN001
        score = sum((i + 1) * t for i, t in enumerate(completion.token_ids)) % 1009 / 10
        self.calls.append((tuple(completion.token_ids), score))
        return score


def test_step_beam_search_keeps_the_best_beams(llm, prompt, long_params):
    scorer = Recorder()
    result = step_beam_search(llm, prompt, 6, 2, long_params, scorer, TWO_TOKENS)
    by_length: dict[int, list[tuple[tuple[int, ...], float]]] = {}
    for tokens, score in scorer.calls:
        by_length.setdefault(len(tokens), []).append((tokens, score))
    assert sorted(by_length) == [2, 4, 6, 8] and all(len(v) == 6 for v in by_length.values())
    for length in (2, 4, 6):
        ranked = sorted(by_length[length], key=lambda c: -c[1])
        kept = {tokens for tokens, _ in ranked[:2]}
        # Every sequence of the next step goes on from one of the two best; each of them three times.
        parents = [tokens[:length] for tokens, _ in by_length[length + 2]]
        assert set(parents) == kept and all(parents.count(p) == 3 for p in kept)
    assert result.num_steps == 3 and len(result.finished) == 6
    assert result.score == max(result.scores) == scorer(prompt, result.best)
    acc = result.accounting
    assert acc.generated_tokens == 4 * 6 * 2  # six sequences sample two tokens in each of four steps
    assert acc.aborted_tokens == 3 * 4 * 2  # four pruned after each of three rounds, two own tokens each
    assert acc.scorer_calls == 24
    assert_no_leak(llm.engine)


def test_best_first_search_expands_the_best_node(llm, prompt, long_params):
    # The deepest node scores best: the search goes straight down, one level per expansion.
    deep = best_first_search(llm, prompt, 3, long_params, lambda p, c: float(len(c.token_ids)), TWO_TOKENS)
    assert deep.num_steps == 3 and len(deep.best.token_ids) == 8 and len(deep.finished) == 3
    assert deep.accounting.generated_tokens == 3 * 2 + 3 * 3 * 2
    # The shallowest node scores best: breadth first, stopped by the expansion budget; no answer has
    # finished by then, so the best partial one runs on alone to the end.
    shallow = best_first_search(
        llm, prompt, 3, long_params, lambda p, c: -float(len(c.token_ids)), TWO_TOKENS, max_expansions=2
    )
    assert shallow.num_steps == 2 and len(shallow.finished) == 1 and len(shallow.best.token_ids) == 8
    assert_no_leak(llm.engine)


def test_a_failing_scorer_leaves_nothing_behind(llm, prompt, long_params):
    def failing(prompt_text: str, completion) -> float:  # noqa: ANN001
        if len(completion.token_ids) > 2:
            raise RuntimeError("reward model down")
        return 0.0

    for search in (
        lambda: step_beam_search(llm, prompt, 4, 2, long_params, failing, TWO_TOKENS),
        lambda: best_first_search(llm, prompt, 2, long_params, failing, TWO_TOKENS),
    ):
        with pytest.raises(ScorerError, match="reward model down"):
            search()
        assert_no_leak(llm.engine)


def test_bad_settings_are_refused(llm, prompt):
    with pytest.raises(InvalidRequestError, match="divide"):
        step_beam_search(llm, prompt, 6, 4)
    with pytest.raises(InvalidRequestError, match="expansions"):
        best_first_search(llm, prompt, 0)
    assert_no_leak(llm.engine)
