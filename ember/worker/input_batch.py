"""The runner's own copy of each request in the batch, kept up to date from SchedulerOutput deltas, so the
runner never reads the engine's live objects (and could run in another process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.engine.scheduler import ForkData, ForkedRequestData, NewRequestData, ScheduledRequest
from ember.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    seed: int
    eos_token_ids: list[int]
    num_computed_tokens: int = 0
    block_ids: list[list[int]] = field(default_factory=list)  # per layer group
    num_candidates: int = 0  # > 0: return this many next-token candidates instead of sampling

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int, drafts: list[int]) -> list[int]:
        """Tokens at positions [start, end) of prompt + outputs + drafts."""
        tokens = []
        prompt_len = len(self.prompt_token_ids)
        if start < prompt_len:
            tokens.extend(self.prompt_token_ids[start : min(end, prompt_len)])
        output_start, output_end = max(start - prompt_len, 0), end - prompt_len
        if output_end > 0:
            tokens.extend(self.output_token_ids[output_start:output_end])
        draft_start = max(start - self.num_tokens, 0)
        tokens.extend(drafts[draft_start : max(end - self.num_tokens, 0)])
        return tokens


class InputBatch:
    def __init__(self) -> None:
        self.states: dict[str, CachedRequestState] = {}

    def remove(self, request_id: str) -> bool:
        return self.states.pop(request_id, None) is not None

    def add(self, new: NewRequestData) -> CachedRequestState:
        state = CachedRequestState(
            new.request_id, new.prompt_token_ids, list(new.output_token_ids), new.params, new.seed, new.eos_token_ids,
            num_candidates=new.num_candidates,
        )
        self.states[new.request_id] = state
        return state

    def fork(self, parent: CachedRequestState, fork: ForkData) -> CachedRequestState:
        """An n > 1 sibling: the parent's prompt (its blocks come with the next step's tables)."""
        state = CachedRequestState(
            fork.request_id, parent.prompt_token_ids, [], parent.params, fork.seed, parent.eos_token_ids,
            parent.num_computed_tokens,
        )
        self.states[fork.request_id] = state
        return state

    def fork_member(self, forked: ForkedRequestData) -> CachedRequestState:
        """A sequence-group member forked off another: the parent's tokens so far."""
        parent = self.states[forked.parent_id]
        state = CachedRequestState(
            forked.request_id, parent.prompt_token_ids, list(parent.output_token_ids), parent.params,
            parent.seed if forked.seed is None else forked.seed,
            parent.eos_token_ids, parent.num_computed_tokens, num_candidates=parent.num_candidates,
        )
        self.states[forked.request_id] = state
        return state

    def update(self, item: ScheduledRequest) -> CachedRequestState:
        state = self.states[item.request_id]
        state.num_computed_tokens = item.num_computed_tokens
        state.block_ids = item.block_ids
        state.output_token_ids.extend(item.new_token_ids)
        return state
