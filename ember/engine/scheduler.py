"""Decides which tokens each step computes, and applies what the step produced (vLLM v1's model, kept small).

Every request has `num_computed_tokens` catching up with its tokens plus any draft tokens; one token
budget per step covers prefill, chunked prefill, decode, speculative verification and prefix-cache hits
alike. Running requests go first (decode, or the next chunk of a long prompt), then waiting requests fill
what is left, first come first served. When KV blocks run out, the most recently admitted running request
is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be recomputed
(prefix caching makes that cheap).

`schedule()` returns plain data for the model runner (which keeps its own copy of each request's state);
`update_from_output()` is the one place a step's results are applied: tokens appended, rejected drafts
rolled back, verified blocks registered in the prefix cache, stop conditions checked, requests finished,
and sequence groups (beam search) advanced: members forked, extended and pruned.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ember.engine.block_manager import KVCacheManager
from ember.engine.request import FinishReason, Request, RequestStatus
from ember.engine.sequence_group import SequenceGroup
from ember.engine.stop import check_stop
from ember.errors import InvalidRequestError
from ember.outputs import PositionLogprobs
from ember.sampling_params import SamplingParams
from ember.worker.runner_output import ModelRunnerOutput


@dataclass
class NewRequestData:
    """A request the runner has not seen (first admission, or again after a preemption)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated before a preemption
    params: SamplingParams
    seed: int
    eos_token_ids: list[int]
    num_candidates: int = 0  # > 0: a sequence-group member; its rows return this many candidates, not a sample


@dataclass
class ForkedRequestData:
    """A sequence-group member forked off another at the parent's current tokens (as the runner knows them);
    its first `new_token_ids` come with its ScheduledRequest."""

    request_id: str
    parent_id: str
    seed: int | None = None  # its own sampling seed (a step group's fork samples on); None: the parent's


@dataclass
class ForkData:
    """An n > 1 sibling that samples its first token from its parent's last prompt row."""

    request_id: str
    seed: int


@dataclass
class ScheduledRequest:
    request_id: str
    num_computed_tokens: int  # tokens whose KV is in the cache before this step
    num_new_tokens: int  # tokens computed this step, drafts included
    block_ids: list[list[int]]  # per layer group, the request's whole block table (a copy)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts appended after the request's tokens
    new_token_ids: list[int] = field(default_factory=list)  # appended by its group since the runner last saw it
    forks: list[ForkData] = field(default_factory=list)
    samples: bool = False  # the chunk reaches the end of the request's tokens: sample (and verify drafts)
    draft: bool = True  # propose drafts after this step (off while the request backs off)


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    forked: list[ForkedRequestData] = field(default_factory=list)  # applied first: parents may be dropped
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    dropped_request_ids: list[str] = field(default_factory=list)  # finished or preempted since the last step
    block_copies: list[tuple[int, int, int]] = field(default_factory=list)  # (group, source, destination)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RequestUpdate:
    """What one step changed in one request (the front end turns it into a RequestOutput)."""

    request: Request
    new_token_ids: list[int]


@dataclass
class SpecDecodeStats:
    """vLLM's speculative-decoding counters."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft_tokens:
            self.accepted_per_position.extend([0] * (num_draft_tokens - len(self.accepted_per_position)))
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1


class Scheduler:
    def __init__(
        self,
        kv_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        num_lookahead_tokens: int = 0,
        disable_by_batch_size: int | None = None,
    ) -> None:
        """`num_lookahead_tokens`: KV slots allocated past a sampling chunk for a model drafter to write
        into; `disable_by_batch_size`: no drafting while more requests than this are scheduled."""
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_lookahead_tokens = num_lookahead_tokens
        self.disable_by_batch_size = disable_by_batch_size
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.spec_stats = SpecDecodeStats()
        self._pending_copies: list[tuple[int, int, int]] = []
        self._dropped: list[str] = []
        self._forking: dict[str, list[Request]] = {}  # parent id -> siblings forking off it this step
        self._forked: list[ForkedRequestData] = []  # group members forked since the last step

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- schedule ---------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(block_copies=self._pending_copies, forked=self._forked)
        self._pending_copies, self._forked = [], []
        budget = self.max_num_batched_tokens
        budget, preempted = self._schedule_running(out, budget)
        if not preempted:
            self._schedule_waiting(out, budget)
        while not out.scheduled and self.waiting and self._preempt_parked():
            self._schedule_waiting(out, budget)
        if self.disable_by_batch_size is not None and len(out.scheduled) > self.disable_by_batch_size:
            for item in out.scheduled:
                item.draft = False
        if out.is_empty():  # the runner does not run: what it must learn waits for the next step
            self._pending_copies, self._forked = out.block_copies, out.forked
            return SchedulerOutput()
        out.dropped_request_ids, self._dropped = self._dropped, []
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.group is not None and request.group.awaits_selection(request):
                index += 1
                continue
            num_new = min(request.num_tokens + len(request.spec_token_ids) - request.num_computed_tokens, budget)
            slots = self._slots(request, request.num_computed_tokens, num_new)
            while not self.kv.allocate(request.request_id, request.num_computed_tokens, slots):
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
        active = self._num_active()
        for request in list(self.waiting):
            if budget <= 0 or active >= self.max_num_seqs:
                break
            if request.group is not None and request.group.awaits_selection(request):
                continue  # preempted after its candidates: it recomputes once its group has chosen
            hashes = request.update_block_hashes(self.kv.block_size)
            computed, num_cached = self.kv.computed_blocks(hashes, request.all_token_ids)
            num_new = min(request.num_tokens - num_cached, budget)
            slots = self._slots(request, num_cached, num_new)
            if not self.kv.allocate(request.request_id, num_cached, slots, computed):
                break
            self.kv.record_lookup(request.num_tokens, num_cached)
            self.waiting.remove(request)
            active += 1
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            request.spec_token_ids = []
            request.pending_token_ids = []  # the runner gets every output token below
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.new_requests.append(
                NewRequestData(
                    request.request_id, list(request.prompt_token_ids), list(request.output_token_ids),
                    request.params, request.seed, request.eos_token_ids,
                    request.group.num_candidates if request.group is not None else 0,
                )
            )
            self._add(out, request, num_new)
            budget -= num_new

    def _preempt_parked(self) -> bool:
        """Free the blocks of the most recently admitted group member that waits for its group's choice (it
        keeps its candidates), when nothing else can run: groups whose members wait for blocks that parked
        members hold would otherwise wait for each other forever."""
        parked = next((r for r in reversed(self.running) if r.group is not None and r.group.awaits_selection(r)), None)
        if parked is None:
            return False
        self._preempt(parked)
        return True

    def _num_active(self) -> int:
        """Running sequences that compute in the next step: a group member waiting for its group's choice
        keeps its KV blocks but not a seat (max_num_seqs), or groups could hold every seat waiting for
        members that cannot be admitted."""
        return sum(1 for r in self.running if r.group is None or not r.group.awaits_selection(r))

    def _slots(self, request: Request, num_computed: int, num_new: int) -> int:
        """KV slots past `num_computed` a step needs: its tokens, plus the drafter's lookahead (up to the
        request's last position) when the chunk reaches the end and samples."""
        if not self.num_lookahead_tokens or num_computed + num_new < request.num_tokens:
            return num_new
        return max(num_new, min(num_new + self.num_lookahead_tokens, request.max_total_len - num_computed))

    def _add(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        real = request.num_tokens - request.num_computed_tokens  # tokens before the drafts
        item = ScheduledRequest(
            request.request_id,
            request.num_computed_tokens,
            num_new,
            [list(table) for table in self.kv.block_tables(request.request_id)],
            spec_token_ids=request.spec_token_ids[: max(0, num_new - real)],
            new_token_ids=request.pending_token_ids,
            samples=num_new >= real,
            draft=request.spec_skip == 0 and request.group is None,
        )
        request.pending_token_ids = []
        if item.samples and not request.output_token_ids and request.pending_forks:
            self._forking[request.request_id] = request.pending_forks
            item.forks = [ForkData(child.request_id, child.seed) for child in request.pending_forks]
            request.pending_forks = []
        out.scheduled.append(item)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.pending_token_ids = []  # a group member keeps its candidates: they depend only on its tokens
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self._dropped.append(request.request_id)
        self.num_preemptions += 1

    # -- update -----------------------------------------------------------------------------------

    def update_from_output(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestUpdate]:
        """Apply one step's results: per scheduled request (and each sibling forked off it), the new
        tokens, in order. Returns what changed in each request that advanced."""
        updates: list[RequestUpdate] = []
        groups: dict[str, SequenceGroup] = {}
        for item in out.scheduled:
            request = self.requests.get(item.request_id)
            if request is None or request.is_finished:
                continue
            row = result.row_of(item.request_id)
            tokens = result.sampled_token_ids[row] if row is not None else []
            prompt_logprobs = result.prompt_logprobs.get(item.request_id)
            if prompt_logprobs is not None:
                request.prompt_logprobs = (request.prompt_logprobs or []) + prompt_logprobs
            rejected = len(item.spec_token_ids) - (len(tokens) - 1) if tokens else 0
            request.num_computed_tokens += item.num_new_tokens - rejected
            request.spec_token_ids = []
            if item.spec_token_ids:
                self.spec_stats.record(len(item.spec_token_ids), len(item.spec_token_ids) - rejected)
                _back_off(request, accepted=len(item.spec_token_ids) - rejected)
            for child in self._forking.pop(item.request_id, []):  # before the parent may finish and free blocks
                updates.extend(self._fork(request, child, result))
            candidates = result.candidates.get(item.request_id)
            if request.group is not None and candidates is not None:
                request.group.candidates[request.request_id] = candidates
                groups[request.group.group_id] = request.group
            new = self._append_tokens(request, tokens, result.logprobs[row] if row is not None else None)
            if request.group is not None:
                request.group.after_tokens(request)
            if not request.is_finished:
                if rejected:  # the table then covers what a step without drafts would hold (+ lookahead)
                    self.kv.truncate(request.request_id, request.num_tokens + self.num_lookahead_tokens)
                self._register_blocks(request)
                if row is not None:
                    self._set_drafts(request, result.spec_token_ids[row])
            updates.append(RequestUpdate(request, new))
        for group in groups.values():
            if group.ready():
                updates.extend(self._advance_group(group))
        return updates

    # -- sequence groups --------------------------------------------------------------------------

    def _advance_group(self, group: SequenceGroup) -> list[RequestUpdate]:
        """Apply the group's selection: fork the members chosen more than once (before any member grows,
        so a child copies its parent's tokens as they are), extend each chosen one by its token, prune the
        rest. When the search is done every member is finished; the group holds the result."""
        members = list(group.members)
        step = group.select()
        if step.done:
            for member in members:
                self.finish(member, FinishReason.STOP)
            return [RequestUpdate(members[0], [])]
        used: set[int] = set()
        chosen = []
        for continuation in step.continuations:
            parent = members[continuation.beam]
            chosen.append(parent if continuation.beam not in used else self._fork_member(parent, group.child_id()))
            used.add(continuation.beam)
        for member, continuation in zip(chosen, step.continuations):
            member.output_token_ids.append(continuation.token_id)
            if member.status == RequestStatus.RUNNING:  # else it is re-admitted with all its tokens
                member.pending_token_ids.append(continuation.token_id)
            if member.first_token_time is None:
                member.first_token_time = time.monotonic()
        for index, member in enumerate(members):
            if index not in used:
                self.finish(member, FinishReason.ABORT)
        group.replace_members(chosen, [c.cumulative_logprob for c in step.continuations])
        return [RequestUpdate(member, [c.token_id]) for member, c in zip(chosen, step.continuations)]

    def advance_step_group(self, group: SequenceGroup, counts: dict[str, int]) -> dict[str, list[str]]:
        """Start the next step of a step group's parked members: a member with count 0 is pruned (its blocks
        return now), one with count k >= 1 goes on and is forked k - 1 times (the forks share its blocks and
        sample with their own seeds); a member without an entry stays parked. Returns, per member going on,
        the ids of its sequences (itself first, then its forks)."""
        live = {m.request_id: m for m in group.members}
        for member_id, count in counts.items():
            if member_id not in live or member_id not in group.parked:
                raise InvalidRequestError(f"{member_id!r} is not a parked member of group {group.group_id!r}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise InvalidRequestError(f"continuations of {member_id!r} must be an integer >= 0, got {count!r}")
        going_on: dict[str, list[str]] = {}
        for member_id, count in counts.items():
            member = live[member_id]
            if count == 0:
                group.remove(member)
                self.finish(member, FinishReason.ABORT)
                continue
            group.unpark(member)
            going_on[member_id] = [member_id]
            for _ in range(count - 1):
                child_id = group.child_id()
                group.add_member(self._fork_member(member, child_id, group.child_seed()))
                going_on[member_id].append(child_id)
        return going_on

    def _fork_member(self, parent: Request, child_id: str, seed: int | None = None) -> Request:
        """A copy of `parent` sharing its KV blocks (with its own sampling `seed`, if given); with no room
        (blocks or sequences), it waits and recomputes its tokens when admitted (prefix-cache hits make that
        cheap)."""
        child = Request(
            request_id=child_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids, params=parent.params,
            max_total_len=parent.max_total_len, seed=parent.seed if seed is None else seed,
            eos_token_ids=parent.eos_token_ids,
            parent_id=parent.parent_id, index=parent.index, arrival_time=parent.arrival_time,
            first_scheduled_time=parent.first_scheduled_time, first_token_time=parent.first_token_time,
            output_token_ids=list(parent.output_token_ids), block_hashes=list(parent.block_hashes),
            group=parent.group, output_text=parent.output_text,
            detokenizer=parent.detokenizer.fork() if parent.detokenizer is not None else None,
            logprobs=list(parent.logprobs) if parent.logprobs is not None else None,
            cumulative_logprob=parent.cumulative_logprob,
        )  # fmt: skip
        self.requests[child_id] = child
        copies = None
        if parent.status == RequestStatus.RUNNING and self._num_active() < self.max_num_seqs:
            copies = self.kv.fork(parent.request_id, child_id, parent.num_computed_tokens)
        if copies is None:
            self.waiting.appendleft(child)
            return child
        self._pending_copies.extend(copies)
        self._forked.append(ForkedRequestData(child_id, parent.request_id, seed))
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = RequestStatus.RUNNING
        self.running.append(child)
        return child

    def _fork(self, parent: Request, child: Request, result: ModelRunnerOutput) -> list[RequestUpdate]:
        """Give `child` the parent's prompt blocks and its first token; with no room, it computes its own
        prompt later (prefix-cache hits make that cheap)."""
        row = result.row_of(child.request_id)
        copies = None
        if len(self.running) < self.max_num_seqs and row is not None:
            copies = self.kv.fork(parent.request_id, child.request_id, parent.num_prompt_tokens)
        if copies is None:
            self._dropped.append(child.request_id)  # the runner made state for it; the request starts over
            self.add(child)
            return []
        self._pending_copies.extend(copies)
        self.requests[child.request_id] = child
        child.num_computed_tokens = parent.num_prompt_tokens
        child.status = RequestStatus.RUNNING
        child.first_scheduled_time = parent.first_scheduled_time
        self.running.append(child)
        new = self._append_tokens(child, result.sampled_token_ids[row], result.logprobs[row])
        if child.group is not None:
            child.group.after_tokens(child)
        if not child.is_finished:
            self._set_drafts(child, result.spec_token_ids[row])
        return [RequestUpdate(child, new)]

    def _append_tokens(
        self, request: Request, tokens: list[int], logprobs: list[PositionLogprobs] | None
    ) -> list[int]:
        """Append tokens one at a time, stopping at the first that ends the request."""
        for i, token in enumerate(tokens):
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            request.output_token_ids.append(token)
            if logprobs is not None and request.logprobs is not None:
                request.logprobs.append(logprobs[i])
                request.cumulative_logprob = (request.cumulative_logprob or 0.0) + logprobs[i][token].logprob
            reason = check_stop(request, token)
            if reason is not None:
                self.finish(request, reason)
                return tokens[: i + 1]
        return tokens

    def _register_blocks(self, request: Request) -> None:
        """Only blocks whose every position holds a verified token enter the prefix cache."""
        hashes = request.update_block_hashes(self.kv.block_size)
        full = request.num_computed_tokens // self.kv.block_size
        self.kv.cache_full_blocks(request.request_id, hashes[:full], request.all_token_ids)

    def _set_drafts(self, request: Request, drafts: list[int]) -> None:
        if request.spec_skip > 0:
            request.spec_skip -= 1
            return
        # Verifying k drafts computes positions up to num_tokens + k - 1: never past the request's last
        # position (a bonus token beyond max_tokens is cut by the length check).
        room = request.max_total_len - request.num_tokens
        request.spec_token_ids = list(drafts[: max(0, room)])

    # -- finish -----------------------------------------------------------------------------------

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Take the request out of the queues and return its blocks."""
        if request.is_finished:
            return
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.spec_token_ids = []
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        self.kv.free(request.request_id)
        self.requests.pop(request.request_id, None)
        self._dropped.append(request.request_id)
        for child in request.pending_forks:  # an unforked sibling runs on as an ordinary request
            self.requests[child.request_id] = child
            self.waiting.appendleft(child)
        request.pending_forks = []


_MAX_SPEC_BACKOFF = 16


def _back_off(request: Request, accepted: int) -> None:
    """Drafts that all fail cost a wider step for nothing: after each wholly rejected draft, skip
    drafting for twice as many steps as the last time (up to 16); any accepted token resets it."""
    if accepted:
        request.spec_backoff = 0
        return
    request.spec_backoff = min(max(1, 2 * request.spec_backoff), _MAX_SPEC_BACKOFF)
    request.spec_skip = request.spec_backoff
