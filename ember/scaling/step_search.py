"""Deterministic searches over reasoning steps, on the engine's step search (as particle filtering is):

- `step_beam_search`: N sequences a step; after each step a process scorer scores them, the best
  `beam_width` go on, each forked into N / beam_width continuations (they share its blocks and sample with
  seeds of their own), the rest are pruned. Finished sequences leave the beam; the search ends when none is
  live, and returns the best-scored finished one.
- `best_first_search` (A*-decoding: a priority queue over partial answers, scored by a process scorer): each
  round, the best-scored node of the frontier is expanded into `expansions` continuations; the other nodes
  wait, parked with their KV blocks (preempted and recomputed if blocks run out). It ends when the best node
  is a finished answer, or after `max_expansions` expansions (then the best finished answer, or, if none has
  finished yet, the best partial one runs on alone to the end, without branching).
"""

from __future__ import annotations

from dataclasses import dataclass

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
class StepSearch:
    best: CompletionOutput
    score: float
    finished: list[CompletionOutput]
    """Every answer that finished during the search, in the order they finished."""
    scores: list[float]
    """Their scores, in the same order."""
    num_steps: int
    """Rounds of scoring and choosing (beam search) or expansions (best-first search)."""
    accounting: Accounting


def step_beam_search(
    llm: LLM | LLMEngine, prompt: Prompt, n: int, beam_width: int, params: SamplingParams | None = None,
    scorer: Scorer = mean_logprob, boundary: StepBoundary = DEFAULT_BOUNDARY, max_steps: int = 64,
) -> StepSearch:  # fmt: skip
    """Beam search over steps with `n` sequences a step and `beam_width` (a divisor of n) kept; after
    `max_steps` rounds the beams run to the end without branching."""
    check_positive(n, "n")
    check_positive(beam_width, "beam_width")
    check_positive(max_steps, "max_steps")
    if n % beam_width:
        raise InvalidRequestError(f"beam_width ({beam_width}) must divide n ({n})")
    rounds = 0
    with StepRun(llm, prompt, params, n, boundary, scorer) as run:
        state = run.next_step()
        while True:
            run.collect_finished(state)
            if not state.parked:
                break
            ids = list(state.parked)
            if rounds >= max_steps:
                run.advance({sequence_id: 1 for sequence_id in ids})
            else:
                scores = run.score([state.parked[i] for i in ids])
                order = sorted(range(len(ids)), key=lambda k: (-scores[k], k))
                keep = set(order[:beam_width])
                run.advance({ids[k]: (n // beam_width if k in keep else 0) for k in range(len(ids))})
                rounds += 1
            state = run.next_step()
    return _result(run, rounds)


def best_first_search(
    llm: LLM | LLMEngine, prompt: Prompt, expansions: int, params: SamplingParams | None = None,
    scorer: Scorer = mean_logprob, boundary: StepBoundary = DEFAULT_BOUNDARY, max_expansions: int = 32,
) -> StepSearch:  # fmt: skip
    """Best-first (A*-style) search: `expansions` continuations per expanded node, at most `max_expansions`
    expansions after the first `expansions` samples."""
    check_positive(expansions, "expansions")
    check_positive(max_expansions, "max_expansions")
    frontier: dict[str, float] = {}  # parked sequence id -> score of its partial answer
    done = 0
    with StepRun(llm, prompt, params, expansions, boundary, scorer) as run:
        state = run.next_step()
        while True:
            run.collect_finished(state)
            new_parked = [s for s in state.parked if s not in frontier]
            frontier.update(zip(new_parked, run.score([state.parked[s] for s in new_parked])))
            if not frontier:
                break
            node = max(frontier, key=frontier.__getitem__)  # the first of equals: the oldest
            if run.finished and max(run.finished_scores) >= frontier[node]:
                break  # the best node is a finished answer
            if done >= max_expansions:
                if run.finished:
                    break
                # No answer yet: the best partial one goes on alone to the end.
                run.advance({s: (1 if s == node else 0) for s in frontier})
                frontier.clear()
            else:
                del frontier[node]
                run.advance({node: expansions})
                done += 1
            state = run.next_step()
    return _result(run, done)


def _result(run: StepRun, steps: int) -> StepSearch:
    best = best_index(run.finished_scores)
    return StepSearch(
        run.finished[best], run.finished_scores[best], run.finished, run.finished_scores, steps,
        run.accounting(run.finished),
    )  # fmt: skip
