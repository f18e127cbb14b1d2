"""Decides which tokens each step computes.

Every request has `num_computed_tokens` catching up with its tokens. A step either runs prompt chunks
(new requests first, FCFS, under `max_num_batched_tokens`) or one decode token for every running
request. Each running request holds one KV-cache slot; a request waits until a slot is free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ember.engine.request import FinishReason, Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the request's tokens, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, num_slots: int, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest slot
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        self._admit_waiting()
        prefill = self._schedule_prefill()
        if not prefill.is_empty():
            return prefill
        return SchedulerOutput([ScheduledRequest(r, 1) for r in self.running])

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Take the request out of the queues and give back its slot."""
        if request.is_finished:
            return
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        if request.slot is not None:
            self.free_slots.append(request.slot)
            self.free_slots.sort(reverse=True)
            request.slot = None

    def _admit_waiting(self) -> None:
        while self.waiting and self.free_slots and len(self.running) < self.max_num_seqs:
            request = self.waiting.popleft()
            request.slot = self.free_slots.pop()
            request.status = RequestStatus.RUNNING
            self.running.append(request)

    def _schedule_prefill(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        out = SchedulerOutput()
        for request in self.running:
            remaining = request.num_tokens - request.num_computed_tokens
            if remaining <= 1 and request.output_token_ids:
                continue  # decoding, not prefilling
            if budget <= 0:
                break
            chunk = min(remaining, budget)
            out.scheduled.append(ScheduledRequest(request, chunk))
            budget -= chunk
        return out
