"""A user request's live sequences, which share KV blocks and are forked and pruned together.

The scheduler forks a member at its current position (the child shares every full block; the partly filled
last one is copied on write, as n > 1 siblings are) and prunes members (their blocks return to the pool at
once). Once every live member has its next-token candidates (the runner returns them instead of sampling),
the group's policy decides which members go on with which token: a member chosen once keeps going, one
chosen k times is forked k - 1 times, one not chosen is pruned. Beam search is that policy here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember.engine.beam_search import BeamSearch, BeamStep, Candidates, Hypothesis

if TYPE_CHECKING:
    from ember.engine.request import Request


class SequenceGroup:
    def __init__(self, group_id: str, policy: BeamSearch) -> None:
        self.group_id = group_id
        self.policy = policy
        self.members: list[Request] = []
        self.scores: dict[str, float] = {}  # member id -> summed log-probability of its generated tokens
        self.candidates: dict[str, Candidates] = {}  # member id -> this step's candidates, until all have them
        self.result: list[Hypothesis] | None = None  # the finished hypotheses, best first, once done
        self.peak_members = 0
        self._forks = 0

    @property
    def num_candidates(self) -> int:
        """Candidates the runner returns per member row."""
        return self.policy.num_candidates

    def add_member(self, request: Request, score: float = 0.0) -> None:
        self.members.append(request)
        self.scores[request.request_id] = score
        self.peak_members = max(self.peak_members, len(self.members))

    def child_id(self) -> str:
        self._forks += 1
        return f"{self.group_id}-beam{self._forks}"

    def awaits_selection(self, request: Request) -> bool:
        """The member has its candidates and waits for the others' (it is not scheduled meanwhile)."""
        return request.request_id in self.candidates

    def ready(self) -> bool:
        return bool(self.members) and all(m.request_id in self.candidates for m in self.members)

    def select(self) -> BeamStep:
        """The policy's step over every member's candidates (all present: see `ready`)."""
        beams = [(m.output_token_ids, self.scores[m.request_id]) for m in self.members]
        step = self.policy.step(beams, [self.candidates[m.request_id] for m in self.members])
        self.candidates.clear()
        if step.done:
            self.result = list(self.policy.finished)
        return step

    def replace_members(self, members: list[Request], scores: list[float]) -> None:
        self.members, self.scores = [], {}
        for member, score in zip(members, scores):
            self.add_member(member, score)
