"""A user request's live sequences, which share KV blocks and are forked and pruned together.

The scheduler forks a member at its current position (the child shares every full block; the partly filled
last one is copied on write, as n > 1 siblings are) and prunes members (their blocks return to the pool at
once). Once every live member has its next-token candidates (the runner returns them instead of sampling),
the group's policy decides which members go on with which token: a member chosen once keeps going, one
chosen k times is forked k - 1 times, one not chosen is pruned. Beam search is that policy here.

A step group (particle filtering, step-wise search) works a step of many tokens at a time instead: its
members sample on their own and park when their step ends (`StepBoundary`); once every live member is
parked, the caller decides how many continuations each gets (`Scheduler.advance_step_group`): 0 prunes it,
k forks it k - 1 times (each fork with its own sampling seed), no entry leaves it parked.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ember.engine.beam_search import BeamSearch, BeamStep, Candidates, Hypothesis
from ember.sampling_params import StepBoundary

if TYPE_CHECKING:
    from ember.engine.request import Request


class SequenceGroup:
    def __init__(self, group_id: str, policy: BeamSearch | None = None, boundary: StepBoundary | None = None,
                 seed: int = 0) -> None:  # fmt: skip
        assert (policy is None) != (boundary is None), "a group is a beam search or a step group"
        self.group_id = group_id
        self.policy = policy
        self.boundary = boundary
        self.seed = seed
        self.parked: set[str] = set()  # step group: members whose step ended, waiting for the caller
        self.ended: list[Request] = []  # step group: members that finished (a stop or the length limit)
        self._step_start: dict[str, tuple[int, int]] = {}  # member id -> (output tokens, text chars) at step start
        self.members: list[Request] = []
        self.scores: dict[str, float] = {}  # member id -> summed log-probability of its generated tokens
        self.candidates: dict[str, Candidates] = {}  # member id -> this step's candidates, until all have them
        self.result: list[Hypothesis] | None = None  # the finished hypotheses, best first, once done
        self.peak_members = 0
        self._forks = 0

    @property
    def num_candidates(self) -> int:
        """Candidates the runner returns per member row (0: a step group's members sample)."""
        return self.policy.num_candidates if self.policy is not None else 0

    def add_member(self, request: Request, score: float = 0.0) -> None:
        self.members.append(request)
        self.scores[request.request_id] = score
        self.peak_members = max(self.peak_members, len(self.members))
        self._step_start[request.request_id] = (len(request.output_token_ids), len(request.output_text))

    def child_id(self) -> str:
        self._forks += 1
        return f"{self.group_id}-{'beam' if self.policy is not None else 'seq'}{self._forks}"

    def child_seed(self) -> int:
        """A fork's own sampling seed (a step group's fork must not replay its parent's noise), derived
        from the group's seed and the fork's number: the same seed gives the same search."""
        return random.Random(f"{self.seed}:{self._forks}").getrandbits(63)

    def awaits_selection(self, request: Request) -> bool:
        """The member has its candidates (or its step ended) and waits for the others (or the caller); it is
        not scheduled meanwhile."""
        return request.request_id in self.candidates or request.request_id in self.parked

    def ready(self) -> bool:
        if self.policy is None:
            return all(m.request_id in self.parked for m in self.members)
        return bool(self.members) and all(m.request_id in self.candidates for m in self.members)

    def after_tokens(self, request: Request) -> None:
        """A step group's member got tokens: a finished one leaves the live set; one whose step text now
        holds the delimiter, or whose step reached max_tokens, parks."""
        if self.boundary is None:
            return
        if request.is_finished:
            if request in self.members:
                self.members.remove(request)
                self.ended.append(request)
            self.parked.discard(request.request_id)
            return
        tokens, chars = self._step_start[request.request_id]
        boundary = self.boundary
        if (boundary.max_tokens is not None and len(request.output_token_ids) - tokens >= boundary.max_tokens) or (
            boundary.delimiter is not None and request.output_text.find(boundary.delimiter, chars) != -1
        ):
            self.parked.add(request.request_id)

    def unpark(self, request: Request) -> None:
        """The member's next step starts now."""
        self.parked.discard(request.request_id)
        self._step_start[request.request_id] = (len(request.output_token_ids), len(request.output_text))

    def remove(self, request: Request) -> None:
        """A pruned member leaves the group."""
        self.members.remove(request)
        self.parked.discard(request.request_id)
        self._step_start.pop(request.request_id, None)

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
