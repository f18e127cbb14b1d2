"""One step search (particle filtering, step beam search, best-first search) as a strategy drives it: the
engine's sequences of one prompt advance a step at a time (`LLMEngine.add_step_search`), the strategy scores
what they wrote and says which go on, forked how many times, and which are pruned. `StepRun` runs the engine
to the end of each step and keeps the accounting: tokens each sequence sampled itself, tokens of pruned
sequences' last steps, scorer calls and time.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from types import TracebackType

from ember.engine.llm import LLM
from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput, StepSearchState
from ember.sampling_params import SamplingParams, StepBoundary
from ember.scaling.accounting import Accounting, Meter
from ember.scaling.sampling import Prompt, as_engine
from ember.scaling.selection import Scorer, score_all

DEFAULT_BOUNDARY = StepBoundary(delimiter="\n\n")  # a step of reasoning ends at a blank line


class StepRun:
    """Use as a context manager: on leaving it, whatever is still live is aborted and its blocks return."""

    def __init__(
        self, llm: LLM | LLMEngine, prompt: Prompt, params: SamplingParams | None, num_sequences: int,
        boundary: StepBoundary, scorer: Scorer,
    ) -> None:  # fmt: skip
        self.engine = engine = as_engine(llm)
        if engine.has_unfinished_requests():
            # The strategy steps the engine itself and would take the other requests' outputs.
            raise InvalidRequestError("the engine has unfinished requests; run scaling strategies on an idle engine")
        params = params or SamplingParams()
        params = replace(params, logprobs=0 if params.logprobs is None else params.logprobs)  # for logprob scorers
        self.prompt_token_ids = engine.process_prompt(prompt).token_ids
        self.prompt = (
            prompt if isinstance(prompt, str) else engine.tokenizer.decode(self.prompt_token_ids, skip_special_tokens=False)
        )
        self.scorer = scorer
        self.request_id = f"steps-{uuid.uuid4().hex}"
        self.scorer_calls = 0
        self.scoring_seconds = 0.0
        self.finished: list[CompletionOutput] = []  # answers `collect_finished` scored, in the order they ended
        self.finished_scores: list[float] = []
        self._base: dict[str, int] = {}  # sequence id -> its length when it was forked (0: from the prompt)
        self._length: dict[str, int] = {}  # sequence id -> its length when last seen
        self._step_start: dict[str, int] = {}  # sequence id -> its length when its current step began
        self._pruned_tokens = 0
        self._meter = Meter(engine)
        engine.add_step_search(self.request_id, self.prompt_token_ids, params, num_sequences, boundary)

    def __enter__(self) -> StepRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.engine.abort_request(self.request_id)

    def next_step(self) -> StepSearchState:
        """Step the engine until every live sequence has ended its step (or finished)."""
        while not self.engine.step_search_ready(self.request_id):
            self.engine.step()
            self._meter.after_step()
        state = self.engine.step_search_state(self.request_id)
        for outputs in (state.parked, state.ended):
            for sequence_id, output in outputs.items():
                self._base.setdefault(sequence_id, 0)
                self._step_start.setdefault(sequence_id, 0)
                self._length[sequence_id] = len(output.token_ids)
        return state

    def score(self, answers: Sequence[CompletionOutput]) -> list[float]:
        if not answers:
            return []
        scores, seconds = score_all(self.scorer, self.prompt, answers)
        self.scorer_calls += len(scores)
        self.scoring_seconds += seconds
        return scores

    def collect_finished(self, state: StepSearchState) -> None:
        """Score the sequences that finished since the last call and add them to `finished`."""
        new = list(state.ended.values())[len(self.finished) :]  # `ended` keeps the order they finished in
        self.finished += new
        self.finished_scores += self.score(new)

    def advance(self, counts: dict[str, int]) -> dict[str, list[str]]:
        """`LLMEngine.advance_step_search`: per parked sequence, its continuations (0 prunes it)."""
        going_on = self.engine.advance_step_search(self.request_id, counts)
        for sequence_id, count in counts.items():
            if count == 0:
                self._pruned_tokens += self._length[sequence_id] - self._step_start[sequence_id]
        for parent_id, sequence_ids in going_on.items():
            start = self._length[parent_id]
            for sequence_id in sequence_ids:
                self._base.setdefault(sequence_id, start)
                self._length[sequence_id] = self._step_start[sequence_id] = start
        return going_on

    def accounting(self, completions: list[CompletionOutput]) -> Accounting:
        """`generated_tokens` counts each sequence's own tokens once (a fork's tokens before the fork are its
        parent's); `aborted_tokens` are those the pruned sequences sampled in the step that got them pruned."""
        def own(sequence_id: str) -> int:
            return self._length[sequence_id] - self._base[sequence_id]

        return replace(
            self._meter.finish(completions, len(self.prompt_token_ids)),
            generated_tokens=sum(own(s) for s in self._length), aborted_tokens=self._pruned_tokens,
            scorer_calls=self.scorer_calls, scoring_seconds=self.scoring_seconds,
        )  # fmt: skip

