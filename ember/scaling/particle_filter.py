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

from dataclasses import dataclass

import torch

from ember.engine.llm import LLM
from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput
from ember.sampling_params import SamplingParams, StepBoundary
from ember.scaling.accounting import Accounting
from ember.scaling.sampling import Prompt, check_positive
from ember.scaling.selection import Scorer, best_index, mean_logprob
from ember.scaling.step_run import DEFAULT_BOUNDARY, StepRun


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
    parent's); `aborted_tokens` are those pruned sequences sampled in the step that got them pruned;
    `scorer_calls` counts every partial or final answer scored."""


@dataclass
class _Particle:
    sequence_id: str | None  # its live engine sequence; None once finished
    completion: CompletionOutput | None = None  # the finished answer (copies share it)
    score: float = 0.0


def particle_filter(
    llm: LLM | LLMEngine, prompt: Prompt, n: int, params: SamplingParams | None = None,
    scorer: Scorer = mean_logprob, boundary: StepBoundary = DEFAULT_BOUNDARY, temperature: float = 1.0,
    seed: int = 0, max_steps: int = 64,
) -> ParticleFilter:  # fmt: skip
    """Particle filtering with `n` particles; `scorer(prompt, completion)` weights a partial answer (a process
    reward: higher is better) and scores the finished ones. After `max_steps` rounds the live particles run
    to the end without further resampling. The sampling noise derives from `params.seed` and the draws from
    `seed`: with both fixed the search repeats exactly."""
    check_positive(n, "the number of particles")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InvalidRequestError(f"the resampling temperature must be > 0, got {temperature!r}")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        raise InvalidRequestError(f"max_steps must be an integer >= 0, got {max_steps!r}")
    generator = torch.Generator().manual_seed(seed)
    resampled: list[list[int]] = []
    with StepRun(llm, prompt, params, n, boundary, scorer) as run:
        state = run.next_step()
        population = [_Particle(sequence_id) for sequence_id in [*state.parked, *state.ended]]
        while True:
            ended = [p for p in population if p.sequence_id in state.ended]
            for particle in ended:
                particle.completion, particle.sequence_id = state.ended[particle.sequence_id], None  # type: ignore[index]
            live = [p for p in population if p.sequence_id is not None]
            answers = [state.parked[p.sequence_id] for p in live] + [p.completion for p in ended]  # type: ignore[index,misc]
            for particle, score in zip(live + ended, run.score(answers)):
                particle.score = score
            if not live:
                break
            if len(resampled) >= max_steps:  # no more resampling: the live particles go on to the end
                run.advance({p.sequence_id: 1 for p in live})  # type: ignore[misc]
            else:
                weights = torch.softmax(torch.tensor([p.score for p in population], dtype=torch.float64) / temperature, 0)
                drawn = sorted(torch.multinomial(weights, n, replacement=True, generator=generator).tolist())
                resampled.append(drawn)
                counts = {p.sequence_id: 0 for p in live}
                for index in drawn:
                    if population[index].sequence_id is not None:
                        counts[population[index].sequence_id] += 1  # type: ignore[index]
                population = _next_population(population, drawn, run.advance(counts))  # type: ignore[arg-type]
            state = run.next_step()
    particles: list[CompletionOutput] = [p.completion for p in population]  # type: ignore[misc]
    final = [p.score for p in population]
    best = best_index(final)
    return ParticleFilter(particles[best], final[best], particles, final, len(resampled), resampled, run.accounting(particles))


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
