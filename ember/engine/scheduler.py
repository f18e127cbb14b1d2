"""Decides which tokens each step computes (vLLM v1's model, kept small).

Every request has `num_computed_tokens` catching up with its tokens; one token budget per step covers
prefill, chunked prefill, decode and prefix-cache hits alike. Running requests go first (decode, or the
next chunk of a long prompt), then waiting requests fill what is left, first come first served. When
KV blocks run out, the most recently admitted running request is preempted: its blocks are freed and it
goes back to the front of the waiting queue, to be recomputed (prefix caching makes that cheap).
"""

from __future__ import annotations

import time

from collections import deque
from dataclasses import dataclass, field

from ember.engine.block_manager import KVCacheManager
from ember.engine.request import FinishReason, Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_tables: list[list[int]]  # per layer group; the block manager's live lists
    fork_children: list[Request] = field(default_factory=list)  # n > 1 siblings sampled from this row

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the request's tokens, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    block_copies: list[tuple[int, int, int]] = field(default_factory=list)  # (group, source, destination)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._pending_copies: list[tuple[int, int, int]] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(block_copies=self._pending_copies)
        self._pending_copies = []
        budget = self.max_num_batched_tokens
        budget, preempted = self._schedule_running(out, budget)
        if not preempted:
            self._schedule_waiting(out, budget)
        return out

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Take the request out of the queues and return its blocks."""
        if request.is_finished:
            return
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        self.kv.free(request.request_id)
        for child in request.pending_forks:  # an unforked sibling runs on as an ordinary request
            self.waiting.appendleft(child)
        request.pending_forks = []

    def after_step(self, scheduled: SchedulerOutput) -> None:
        """Register newly filled blocks in the prefix cache and fork n > 1 siblings off their prompt."""
        for item in scheduled.scheduled:
            request = item.request
            if request.is_finished:
                continue
            hashes = request.update_block_hashes(self.kv.block_size)
            self.kv.cache_full_blocks(request.request_id, hashes[: request.num_computed_tokens // self.kv.block_size], request.all_token_ids)

    def fork(self, parent: Request, child: Request) -> bool:
        """Give `child` the parent's prompt blocks (its first token is already sampled). False: no room."""
        if len(self.running) >= self.max_num_seqs:
            return False
        copies = self.kv.fork(parent.request_id, child.request_id, parent.num_prompt_tokens)
        if copies is None:
            return False
        self._pending_copies.extend(copies)
        child.num_computed_tokens = parent.num_prompt_tokens
        child.status = RequestStatus.RUNNING
        self.running.append(child)
        return True

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request.request_id, request.num_computed_tokens, num_new):
                victim = self.running[-1]  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break
            self._add(out, request, num_new)
            budget -= num_new
            index += 1
        return budget, preempted

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hashes = request.update_block_hashes(self.kv.block_size)
            computed, num_cached = self.kv.computed_blocks(hashes, request.all_token_ids)
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate(request.request_id, num_cached, num_new, computed):
                break
            self.kv.record_lookup(request.num_tokens, num_cached)
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            self._add(out, request, num_new)
            budget -= num_new

    def _add(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        item = ScheduledRequest(request, num_new, self.kv.block_tables(request.request_id))
        if item.samples and not request.output_token_ids:
            item.fork_children = request.pending_forks
            request.pending_forks = []
        out.scheduled.append(item)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1
