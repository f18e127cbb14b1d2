"""Scorers: how good one completion is, as a float (higher is better).

A scorer is any callable `(prompt, completion) -> float`; a verifier returns 1.0 or 0.0, a reward model its
log-probability of a verdict. One that can score many completions at once (a reward model batching them into
one engine run) also has `score_batch(prompt, completions) -> list[float]`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from ember.errors import EmberError
from ember.outputs import CompletionOutput

Scorer = Callable[[str, CompletionOutput], float]
T = TypeVar("T")


@runtime_checkable
class BatchScorer(Protocol):
    def __call__(self, prompt: str, completion: CompletionOutput) -> float: ...

    def score_batch(self, prompt: str, completions: Sequence[CompletionOutput]) -> list[float]: ...


class ScorerError(EmberError):
    """A scorer raised (its error is the cause) or returned something that is not a score."""


def total_logprob(prompt: str, completion: CompletionOutput) -> float:
    """The model's log-probability of the whole completion (favours short ones)."""
    if completion.cumulative_logprob is None:
        raise ScorerError(f"completion {completion.index} has no cumulative_logprob (sample with logprobs=0)")
    return completion.cumulative_logprob


def mean_logprob(prompt: str, completion: CompletionOutput) -> float:
    """The model's mean log-probability per generated token."""
    return total_logprob(prompt, completion) / max(1, len(completion.token_ids))


def score_all(scorer: Scorer, prompt: str, completions: Sequence[CompletionOutput]) -> tuple[list[float], float]:
    """Every completion's score (in one call for a batch scorer) and the seconds it took."""
    start = time.perf_counter()
    name = getattr(scorer, "__name__", type(scorer).__name__)
    if isinstance(scorer, BatchScorer):
        scores = guarded(lambda: scorer.score_batch(prompt, completions), f"scorer {name} (score_batch)")
        if len(scores) != len(completions):
            raise ScorerError(f"scorer {name}: score_batch gave {len(scores)} scores, not {len(completions)}")
    else:
        scores = [guarded(lambda c=c: scorer(prompt, c), f"scorer {name} on completion {c.index}") for c in completions]
    return [_number(s, name) for s in scores], time.perf_counter() - start


def best_index(scores: Sequence[float]) -> int:
    """The highest score's position; the first one on a tie."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def guarded(fn: Callable[[], T], what: str) -> T:
    """fn(), with any error it raises wrapped in a ScorerError that names `what`."""
    try:
        return fn()
    except ScorerError:
        raise
    except Exception as e:
        raise ScorerError(f"{what} raised {type(e).__name__}: {e}") from e


def _number(value: object, name: str) -> float:
    """-inf is a valid score (nothing worse); NaN and +inf are not."""
    if isinstance(value, (int, float)) and not math.isnan(value) and value != math.inf:
        return float(value)
    raise ScorerError(f"scorer {name} returned {value!r}; a score must be a number (-inf for the worst), not NaN")
