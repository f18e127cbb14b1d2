"""Self-consistency: sample N completions, extract each one's final answer, return the majority answer."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ember.engine.llm import LLM
from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput
from ember.sampling_params import SamplingParams
from ember.scaling.accounting import Accounting
from ember.scaling.early_stop import EarlyStop
from ember.scaling.sampling import Prompt, sample
from ember.scaling.selection import ScorerError, guarded

Extractor = Callable[[str], str | None]
"""A completion's text -> its answer, or None when it gives none."""


@dataclass
class Tally:
    answer: str | None
    """The majority answer; None when no candidate gave one (see `no_answer`)."""
    vote_share: float
    """Candidates that gave the answer / all candidates (those without an answer count too)."""
    votes: dict[str, int]
    """Every answer given and how many candidates gave it, in the order first seen."""
    supporting: list[CompletionOutput]
    """The candidates that gave the answer."""
    no_answer: str | None = None
    """Why `answer` is None."""


@dataclass
class Vote:
    tally: Tally
    answers: list[str | None]
    """Each candidate's answer, in the order of `candidates`."""
    candidates: list[CompletionOutput]
    """The completions that voted (all N, or the first m to finish under an early stop)."""
    completions: list[CompletionOutput]
    """All N, aborted ones included (finish_reason "abort")."""
    accounting: Accounting

    @property
    def answer(self) -> str | None:
        return self.tally.answer

    @property
    def vote_share(self) -> float:
        return self.tally.vote_share

    @property
    def supporting(self) -> list[CompletionOutput]:
        return self.tally.supporting


def regex_extractor(pattern: str | re.Pattern[str]) -> Extractor:
    """The last match of `pattern` in the text (its first group when it has one), stripped."""
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError) as e:
        raise InvalidRequestError(f"answer pattern {pattern!r} is not a valid regular expression: {e}") from e

    def extract(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        return matches[-1].group(1 if compiled.groups else 0).strip()

    extract.__name__ = f"regex {compiled.pattern!r}"
    return extract


def self_consistency(
    llm: LLM | LLMEngine, prompt: Prompt, n: int, extract: str | re.Pattern[str] | Extractor,
    params: SamplingParams | None = None, early_stop: EarlyStop | None = None,
) -> Vote:  # fmt: skip
    """Majority vote over the answers `extract` (a regex, or a callable) finds in `n` samples; with
    `early_stop` (short-m@k), among the first m to finish."""
    extractor = extract if callable(extract) else regex_extractor(extract)
    samples = sample(llm, prompt, n, params, early_stop)
    start = time.perf_counter()
    name = _name(extractor)
    answers = [_answer(extractor, name, c) for c in samples.candidates]
    tally = majority_vote(samples.candidates, answers)
    if tally.answer is None:
        tally = replace(tally, no_answer=f"{name} found no answer in any of the {len(answers)} candidates")
    accounting = replace(samples.accounting, scoring_seconds=time.perf_counter() - start)
    return Vote(tally, answers, samples.candidates, samples.completions, accounting)


def majority_vote(candidates: list[CompletionOutput], answers: list[str | None]) -> Tally:
    """The most given answer. Ties go to the answer whose supporters have the higher summed log-probability,
    then to the one seen first."""
    votes: dict[str, int] = {}
    logprob: dict[str, float] = {}
    for candidate, answer in zip(candidates, answers):
        if answer is not None:
            votes[answer] = votes.get(answer, 0) + 1
            cumulative = candidate.cumulative_logprob
            logprob[answer] = logprob.get(answer, 0.0) + (cumulative if cumulative is not None else -math.inf)
    if not votes:
        return Tally(None, 0.0, {}, [], no_answer=f"none of the {len(candidates)} candidates gave an answer")
    order = list(votes)
    winner = max(order, key=lambda a: (votes[a], logprob[a], -order.index(a)))
    supporting = [c for c, a in zip(candidates, answers) if a == winner]
    return Tally(winner, votes[winner] / len(candidates), votes, supporting)


def _name(extractor: Extractor) -> str:
    return "answer extractor " + getattr(extractor, "__name__", type(extractor).__name__)


def _answer(extractor: Extractor, name: str, completion: CompletionOutput) -> str | None:
    answer = guarded(lambda: extractor(completion.text), f"{name} on completion {completion.index}")
    if answer is not None and not isinstance(answer, str):
        raise ScorerError(f"{name} returned {answer!r}; an answer must be a string or None")
    return answer
