"""Best-of-N: sample N completions in one request, score them, keep the best."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ember.engine.llm import LLM
from ember.engine.llm_engine import LLMEngine
from ember.outputs import CompletionOutput
from ember.sampling_params import SamplingParams
from ember.scaling.accounting import Accounting
from ember.scaling.early_stop import EarlyStop
from ember.scaling.sampling import Prompt, sample
from ember.scaling.selection import Scorer, best_index, mean_logprob, score_all


@dataclass
class BestOfN:
    best: CompletionOutput
    score: float
    candidates: list[CompletionOutput]
    """The completions scored (all N, or the first m to finish under an early stop)."""
    scores: list[float]
    """The candidates' scores, in the same order."""
    completions: list[CompletionOutput]
    """All N, aborted ones included (finish_reason "abort")."""
    accounting: Accounting


def best_of_n(
    llm: LLM | LLMEngine, prompt: Prompt, n: int, params: SamplingParams | None = None,
    scorer: Scorer = mean_logprob, early_stop: EarlyStop | None = None,
) -> BestOfN:  # fmt: skip
    """The highest-scoring of `n` samples (the first of them on a tie). `scorer` is `mean_logprob` (the
    model's own confidence), `total_logprob`, any `(prompt, completion) -> float`, a `CodeVerifier` or a
    `RewardModel`; with `early_stop`, only the first m samples to finish are scored."""
    samples = sample(llm, prompt, n, params, early_stop)
    scores, seconds = score_all(scorer, samples.prompt, samples.candidates)
    best = best_index(scores)
    accounting = replace(samples.accounting, scorer_calls=len(scores), scoring_seconds=seconds)
    return BestOfN(samples.candidates[best], scores[best], samples.candidates, scores, samples.completions, accounting)
