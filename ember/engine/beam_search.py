"""Beam search's selection step, with Hugging Face transformers' semantics (`GenerationMixin._beam_search`).

Each step, every running beam offers its most likely next tokens; of all (beam, token) continuations the
`num_candidates` = max(2, 1 + number of EOS tokens) x beam_width best by summed log-probability are kept.
Of those, the ones that end (an EOS token, or the max_tokens-th token) and rank among the first beam_width
become finished hypotheses, scored sum of logprobs / generated_length ** length_penalty; the best
beam_width that do not end run on. Scores are float32 sums, as transformers computes them, so near ties
break the same way. When to stop follows `early_stopping` (see BeamSearchParams).

This module is only the arithmetic; the sequence group (sequence_group.py) forks, prunes and feeds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ember.sampling_params import BeamSearchParams

_FINISHED = -1.0e9  # transformers' "never pick this" score offset


@dataclass(frozen=True)
class Candidates:
    """One beam's most likely next tokens and their log-probabilities, best first."""

    token_ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class Hypothesis:
    token_ids: list[int]  # generated tokens, the last (an EOS or the max_tokens-th) included
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass(frozen=True)
class Continuation:
    beam: int  # index, in the order given to `step`, of the beam it extends
    token_id: int
    cumulative_logprob: float


@dataclass(frozen=True)
class BeamStep:
    continuations: list[Continuation]  # the next running beams, best first; empty when done
    done: bool


class BeamSearch:
    def __init__(self, params: BeamSearchParams, eos_token_ids: Sequence[int]) -> None:
        self.params = params
        self.eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.num_candidates = max(2, 1 + len(self.eos)) * params.beam_width
        self.finished: list[Hypothesis] = []  # best first, at most beam_width
        self.num_generated = 0  # tokens every running beam has generated
        self._improvable = True  # transformers' is_early_stop_heuristic_unsatisfied

    def step(self, beams: Sequence[tuple[list[int], float]], candidates: Sequence[Candidates]) -> BeamStep:
        """`beams`: per running beam, its generated tokens and summed log-probability; `candidates`: per
        beam, its top tokens (at least `num_candidates` of them, or the whole vocabulary)."""
        width, params = self.params.beam_width, self.params
        width_c = max(len(c.token_ids) for c in candidates)
        logprobs = torch.full((len(beams), width_c), float("-inf"))
        for i, c in enumerate(candidates):
            logprobs[i, : len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
        scores = torch.tensor([score for _, score in beams], dtype=torch.float32)
        flat = (scores[:, None] + logprobs).flatten()
        top_scores, top_index = flat.topk(min(self.num_candidates, int(torch.isfinite(flat).sum())))
        picked = [(int(i) // width_c, candidates[int(i) // width_c].token_ids[int(i) % width_c]) for i in top_index]
        last = self.num_generated + 1 >= params.max_tokens
        ends = torch.tensor([last or token in self.eos for _, token in picked])

        running_scores = top_scores + ends.to(torch.float32) * _FINISHED
        order = running_scores.topk(min(width, len(picked))).indices.tolist()
        continuations = [Continuation(picked[i][0], picked[i][1], float(running_scores[i])) for i in order]

        self._add_finished(beams, picked, top_scores, ends)
        self.num_generated += 1
        self._update_improvable(float(running_scores[order[0]]))
        full = len(self.finished) == width
        done = not self._improvable or (full and params.early_stopping is True) or bool(ends.all())
        return BeamStep([] if done else continuations, done)

    def _add_finished(
        self, beams: Sequence[tuple[list[int], float]], picked: list[tuple[int, int]], top_scores: torch.Tensor,
        ends: torch.Tensor,
    ) -> None:
        """Continuations that end and rank among the first beam_width join the finished hypotheses, unless
        the search already cannot improve (or, with early_stopping=True, the list is full)."""
        width = self.params.beam_width
        if not self._improvable or (len(self.finished) == width and self.params.early_stopping is True):
            return
        normalized = top_scores / ((self.num_generated + 1) ** self.params.length_penalty)
        new = []
        for rank, (beam, token) in enumerate(picked[:width]):
            if bool(ends[rank]):
                reason = "stop" if token in self.eos else "length"
                tokens = [*beams[beam][0], token]
                new.append(Hypothesis(tokens, float(top_scores[rank]), float(normalized[rank]), reason))
        # A stable sort keeps earlier hypotheses ahead of equal new ones, as transformers' merge does.
        self.finished = sorted(self.finished + new, key=lambda h: -h.score)[:width]

    def _update_improvable(self, best_running: float) -> None:
        """Whether the best running beam could still beat the worst finished hypothesis (transformers'
        heuristic: its score now, normalized by the current length, or by max_tokens for "never" with a
        positive length penalty)."""
        if len(self.finished) < self.params.beam_width:
            return
        penalty = self.params.length_penalty
        length = self.params.max_tokens if self.params.early_stopping == "never" and penalty > 0 else self.num_generated
        best_possible = torch.tensor(best_running, dtype=torch.float32) / (length**penalty)
        worst = torch.tensor(self.finished[-1].score, dtype=torch.float32)
        self._improvable = self._improvable and bool(best_possible > worst)
