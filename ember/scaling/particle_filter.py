"""Particle filtering over reasoning steps (Puri et al., "A Probabilistic Inference Approach to Inference-Time
Scaling of LLMs using Particle-Based Monte Carlo Methods"), on the engine's step search.

N particles share the prompt's KV blocks and advance one step at a time (a step ends at a delimiter such as
a blank line, or after k tokens: `StepBoundary`). After each step a process scorer scores every particle's
partial answer; N particles are drawn with replacement with probabilities softmax(score / temperature), from
a generator seeded by `seed`. A live particle drawn k times goes on and is forked k - 1 times (the forks
share its blocks and sample with seeds of their own); one never drawn is pruned and its blocks return at
once. A particle that has finished keeps its last score and takes part in every later draw; a draw of it
copies the finished answer. The search ends when every particle has finished; the answer is the particle
with the highest final score.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

import torch

from ember.engine.llm import LLM
from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput, StepSearchState
from ember.sampling_params import SamplingParams, StepBoundary
from ember.scaling.accounting import Accounting, Meter
from ember.scaling.sampling import Prompt, as_engine
from ember.scaling.selection import Scorer, best_index, mean_logprob, score_all

DEFAULT_BOUNDARY = StepBoundary(delimiter="\n\n")


@dataclass
class ParticleFilter:
    best: CompletionOutput
    score: float
    """The best particle's final score."""
    particles: list[CompletionOutput]
    """The final population: N finished answers, copies of one answer included."""
    scores: list[float]
    """The final particles' scores, in the same order."""
    num_steps: int
    """Resampling rounds the search ran."""
    resampled: list[list[int]]
    """Per round, for each new particle, the index (in the population before the draw) it was drawn from."""
    accounting: Accounting
    """`generated_tokens` counts each sequence's own tokens once (a fork's tokens before the fork are its
    parent's); `aborted_tokens` are those of sequences pruned at a resampling; `scorer_calls` counts every
    partial or final answer scored."""


@dataclass
class _Particle:
    sequence_id: str | None  # its live engine sequence; None once finished
    completion: CompletionOutput | None = None  # the finished answer (copies share it)
    score: float = 0.0


class _TokenCount:
    """Tokens each engine sequence sampled itself: its length when last seen minus its length when forked."""

    def __init__(self) -> None:
        self.base: dict[str, int] = {}
        self.length: dict[str, int] = {}
        self.pruned: set[str] = set()

    def see(self, outputs: dict[str, CompletionOutput]) -> None:
        for sequence_id, output in outputs.items():
            self.base.setdefault(sequence_id, 0)
            self.length[sequence_id] = len(output.token_ids)

    def forked(self, parent_id: str, child_id: str) -> None:
        self.base[child_id] = self.length[child_id] = self.length[parent_id]

    def own(self, sequence_id: str) -> int:
        return self.length[sequence_id] - self.base[sequence_id]

    @property
    def total(self) -> int:
        return sum(self.own(s) for s in self.length)

    @property
    def total_pruned(self) -> int:
        return sum(self.own(s) for s in self.pruned)


def particle_filter(
    llm: LLM | LLMEngine, prompt: Prompt, n: int, params: SamplingParams | None = None,
    scorer: Scorer = mean_logprob, boundary: StepBoundary = DEFAULT_BOUNDARY, temperature: float = 1.0,
    seed: int = 0, max_steps: int = 64,
) -> ParticleFilter:  # fmt: skip
    """Particle filtering with `n` particles; `scorer(prompt, completion)` weights a partial answer (a process
    reward: higher is better) and scores the finished ones. After `max_steps` rounds the live particles run
    to the end without further resampling. The sampling noise derives from `params.seed` and the draws from
    `seed`: with both fixed the search repeats exactly."""
    engine = as_engine(llm)
    _check(n, temperature, max_steps)
    params = params or SamplingParams()
    params = replace(params, logprobs=0 if params.logprobs is None else params.logprobs)
    if engine.has_unfinished_requests():
        raise InvalidRequestError("the engine has unfinished requests; run scaling strategies on an idle engine")
    prompt_ids = engine.process_prompt(prompt).token_ids
    prompt_text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)
    request_id = f"particles-{uuid.uuid4().hex}"
    meter = Meter(engine)
    generator = torch.Generator().manual_seed(seed)
    counted = _TokenCount()
    scorer_calls, scoring_seconds, resampled = 0, 0.0, []
    engine.add_step_search(request_id, prompt_ids, params, n, boundary)
    try:
        state = _run_step(engine, request_id, meter)
        population = [_Particle(sequence_id) for sequence_id in [*state.parked, *state.ended]]
        while True:
            counted.see(state.parked)
            counted.see(state.ended)
            ended = [p for p in population if p.sequence_id in state.ended]
            for particle in ended:
                particle.completion, particle.sequence_id = state.ended[particle.sequence_id], None  # type: ignore[index]
            live = [p for p in population if p.sequence_id is not None]
            to_score = live + ended
            answers = [state.parked[p.sequence_id] for p in live] + [p.completion for p in ended]  # type: ignore[index,misc]
            scores, seconds = score_all(scorer, prompt_text, answers)
            scorer_calls, scoring_seconds = scorer_calls + len(scores), scoring_seconds + seconds
            for particle, score in zip(to_score, scores):
                particle.score = score
            if not live:
                break
            if len(resampled) >= max_steps:  # no more resampling: the live particles go on to the end
                engine.advance_step_search(request_id, {p.sequence_id: 1 for p in live})  # type: ignore[misc]
            else:
                weights = torch.softmax(torch.tensor([p.score for p in population], dtype=torch.float64) / temperature, 0)
                drawn = sorted(torch.multinomial(weights, n, replacement=True, generator=generator).tolist())
                resampled.append(drawn)
                counts = {p.sequence_id: 0 for p in live}
                for index in drawn:
                    if population[index].sequence_id is not None:
                        counts[population[index].sequence_id] += 1  # type: ignore[index]
                counted.pruned.update(s for s, c in counts.items() if c == 0)  # type: ignore[misc]
                going_on = engine.advance_step_search(request_id, counts)  # type: ignore[arg-type]
                for parent_id, sequence_ids in going_on.items():
                    for child_id in sequence_ids[1:]:
                        counted.forked(parent_id, child_id)
                population = _next_population(population, drawn, going_on)
            state = _run_step(engine, request_id, meter)
    finally:
        engine.abort_request(request_id)  # frees whatever is still live (nothing, after a full run)
    particles: list[CompletionOutput] = [p.completion for p in population]  # type: ignore[misc]
    final = [p.score for p in population]
    best = best_index(final)
    accounting = replace(
        meter.finish(particles, len(prompt_ids)), generated_tokens=counted.total, aborted_tokens=counted.total_pruned,
        scorer_calls=scorer_calls, scoring_seconds=scoring_seconds,
    )  # fmt: skip
    return ParticleFilter(particles[best], final[best], particles, final, len(resampled), resampled, accounting)


def _check(n: int, temperature: float, max_steps: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidRequestError(f"the number of particles must be a positive integer, got {n!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InvalidRequestError(f"the resampling temperature must be > 0, got {temperature!r}")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        raise InvalidRequestError(f"max_steps must be an integer >= 0, got {max_steps!r}")


def _run_step(engine: LLMEngine, request_id: str, meter: Meter) -> StepSearchState:
    """Step the engine until every live sequence has ended its step."""
    state = engine.step_search_state(request_id)
    while not state.ready:
        engine.step()
        meter.after_step()
        state = engine.step_search_state(request_id)
    return state


def _next_population(population: list[_Particle], drawn: list[int], going_on: dict[str, list[str]]) -> list[_Particle]:
    """The drawn particles: a finished one copied, a live one as the next of its sequences going on."""
    unused = {parent: list(ids) for parent, ids in going_on.items()}
    result = []
    for index in drawn:
        particle = population[index]
        if particle.sequence_id is None:
            result.append(_Particle(None, particle.completion, particle.score))
        else:
            result.append(_Particle(unused[particle.sequence_id].pop(0), score=particle.score))
    return result
