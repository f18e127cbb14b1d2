"""A reward model served by ember: a causal LM that scores a completion by log-probabilities it reads off a
prompt (`prompt_logprobs`), with no token sampled that matters.

Two ways to score:
- verdict: the mean log-probability of a fixed continuation (e.g. " yes") after a judging text made from the
  prompt and the completion (`template`), the usual generative-verifier reading of "is this right?";
- likelihood (`verdict=None`): the mean log-probability of the completion's own text after the prompt, i.e.
  how plausible another (often larger) model finds it.
All completions of one call are scored in one batched engine run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ember.engine.llm import LLM
from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput, PositionLogprobs
from ember.sampling_params import SamplingParams

_SCORING = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)


@dataclass
class RewardModel:
    llm: LLM
    """Its engine must have prefix caching off (`RewardModel.load` does that): ember returns no prompt
    log-probabilities for positions a prefix-cache hit skipped, and completions of one prompt share a prefix."""
    template: str = "{prompt}{completion}"
    """The judging text, with {prompt} and {completion}; with `verdict=None`, the text before the completion is
    `template` with {completion} empty."""
    verdict: str | None = None
    """The continuation whose log-probability is the score; None scores the completion itself."""

    def __post_init__(self) -> None:
        if self.llm.engine.config.enable_prefix_caching:
            raise InvalidRequestError(
                "a reward model's LLM needs enable_prefix_caching=False: prompt logprobs skip positions found in "
                "the prefix cache (RewardModel.load builds it so)"
            )
        try:
            self.template.format(prompt="", completion="")
        except (KeyError, IndexError, ValueError) as e:
            raise InvalidRequestError(f"reward template must use only {{prompt}} and {{completion}}: {e!r}") from e
        if self.verdict == "":
            raise InvalidRequestError("reward verdict must be a non-empty string, or None to score the completion")

    @classmethod
    def load(cls, model: str, template: str = "{prompt}{completion}", verdict: str | None = None,
             **engine_args: Any) -> RewardModel:  # fmt: skip
        return cls(LLM(model, enable_prefix_caching=False, **engine_args), template, verdict)

    def __call__(self, prompt: str, completion: CompletionOutput) -> float:
        return self.score_batch(prompt, [completion])[0]

    def score_batch(self, prompt: str, completions: Sequence[CompletionOutput]) -> list[float]:
        """Mean log-probability of each completion's scored tokens; -inf for an empty one (likelihood mode)."""
        pieces = [self._pieces(prompt, c) for c in completions]
        scored = [i for i, (_, tail) in enumerate(pieces) if tail]
        outputs = self.llm.generate([pieces[i][0] + pieces[i][1] for i in scored], _SCORING, use_tqdm=False)
        scores = [-math.inf] * len(pieces)
        for i, out in zip(scored, outputs):
            scores[i] = _mean_tail_logprob(out.prompt_logprobs, pieces[i][1])
        return scores

    def _pieces(self, prompt: str, completion: CompletionOutput) -> tuple[list[int], list[int]]:
        """(context token ids, scored token ids)."""
        tokenizer = self.llm.get_tokenizer()
        if self.verdict is None:
            context = self.template.format(prompt=prompt, completion="")
            tail = tokenizer.encode(completion.text, add_special_tokens=False)
        else:
            context = self.template.format(prompt=prompt, completion=completion.text)
            tail = tokenizer.encode(self.verdict, add_special_tokens=False)
        context_ids = tokenizer.encode(context)
        if not context_ids:  # the first token of a prompt has no log-probability
            raise InvalidRequestError("the reward template gives no text before the scored tokens")
        return context_ids, tail


def _mean_tail_logprob(entries: list[PositionLogprobs | None] | None, tail: list[int]) -> float:
    assert entries is not None and len(entries) >= len(tail), "prompt logprobs must cover the scored tokens"
    scored = entries[len(entries) - len(tail) :]
    logprobs = [entry[token].logprob for entry, token in zip(scored, tail) if entry is not None]
    assert len(logprobs) == len(tail)
    return sum(logprobs) / len(tail)
