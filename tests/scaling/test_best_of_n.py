"""Best-of-N picks what its scorer says: a scripted scorer, the model's own log-probabilities, a batch scorer."""

from __future__ import annotations

import math

import pytest

from ember.outputs import CompletionOutput
from ember.scaling import FIRST_FINISH, ScorerError, best_index, best_of_n, mean_logprob, score_all, total_logprob
from helpers import assert_no_leak


def test_picks_what_a_scripted_scorer_dictates(llm, prompt, short):
    script = [0.1, 0.9, 0.3, 0.9, -2.0]  # a tie at the top: the first of them wins

    def scripted(text: str, completion: CompletionOutput) -> float:
        assert text == prompt
        return script[completion.index]

    result = best_of_n(llm, prompt, 5, short, scorer=scripted)
    assert result.best.index == 1 and result.score == 0.9
    assert result.scores == script and result.candidates == result.completions
    assert result.accounting.scorer_calls == 5
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("scorer", [mean_logprob, total_logprob])
def test_logprob_selector_picks_the_max(llm, prompt, short, scorer):
    result = best_of_n(llm, prompt, 4, short, scorer=scorer)
    expected = [c.cumulative_logprob / (len(c.token_ids) if scorer is mean_logprob else 1) for c in result.completions]
    assert result.scores == pytest.approx(expected)
    assert result.score == max(expected) and result.best.index == expected.index(max(expected))


def test_a_batch_scorer_is_called_once(llm, prompt, short):
    class Batched:
        calls = 0

        def __call__(self, text: str, completion: CompletionOutput) -> float:
            raise AssertionError("score_batch should be used")

        def score_batch(self, text: str, completions: list[CompletionOutput]) -> list[float]:
            self.calls += 1
            return [float(len(c.token_ids)) for c in completions]

    scorer = Batched()
    result = best_of_n(llm, prompt, 4, short, scorer=scorer)
    lengths = [len(c.token_ids) for c in result.completions]
    assert scorer.calls == 1 and result.best.index == lengths.index(max(lengths))
    assert result.accounting.scorer_calls == 4


def test_early_stop_scores_only_the_finished(llm, prompt, params):
    result = best_of_n(llm, prompt, 4, params, scorer=lambda text, c: 1.0, early_stop=FIRST_FINISH)
    assert len(result.candidates) == len(result.scores) == 1 == result.accounting.scorer_calls
    assert result.best.finish_reason == "stop"
    assert result.accounting.num_aborted == 3
    assert_no_leak(llm.engine)


def test_a_scorer_that_raises_propagates_with_context(llm, prompt, short):
    def broken(text: str, completion: CompletionOutput) -> float:
        if completion.index == 2:
            raise KeyError("no such test")
        return 0.0

    with pytest.raises(ScorerError, match=r"scorer broken on completion 2 raised KeyError") as info:
        best_of_n(llm, prompt, 3, short, scorer=broken)
    assert isinstance(info.value.__cause__, KeyError)
    assert_no_leak(llm.engine)


def _completions(count: int) -> list[CompletionOutput]:
    return [CompletionOutput(index=i, text=f"c{i}", token_ids=[i]) for i in range(count)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, "high", None])
def test_a_score_must_be_a_number(bad):
    with pytest.raises(ScorerError, match="a score must be a number"):
        score_all(lambda text, c: bad, "p", _completions(2))


def test_minus_infinity_is_the_worst_score():
    scores, _ = score_all(lambda text, c: -math.inf if c.index != 1 else -5.0, "p", _completions(3))
    assert best_index(scores) == 1


def test_a_batch_scorer_must_give_a_score_per_completion():
    class Short:
        def __call__(self, text: str, completion: CompletionOutput) -> float:
            return 0.0

        def score_batch(self, text: str, completions: list[CompletionOutput]) -> list[float]:
            return [0.0]

    with pytest.raises(ScorerError, match="1 scores, not 3"):
        score_all(Short(), "p", _completions(3))
