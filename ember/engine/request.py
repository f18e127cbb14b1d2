"""A request's state as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember.engine.block_manager import block_hashes
from ember.outputs import PositionLogprobs
from ember.sampling_params import SamplingParams
from ember.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from ember.engine.sequence_group import SequenceGroup


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass
class Request:
    """One sequence. `num_computed_tokens` catches up with `all_token_ids` (prompt, then outputs);
    every step schedules some of the difference, which covers prefill, chunked prefill and decode."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_len: int  # prompt + outputs stop here (max_tokens or the context limit)
    seed: int  # the sampling noise at each position derives from (seed, position): see worker/sampling_noise.py
    eos_token_ids: list[int]
    parent_id: str  # the user's request id (differs for the children of n > 1)
    index: int = 0  # which of the parent's n completions this is
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # when it was first admitted (queue time ends)
    first_token_time: float | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of the full blocks of all_token_ids
    pending_forks: list[Request] = field(default_factory=list)  # n > 1: siblings that fork off after the prompt
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify in the next step
    spec_backoff: int = 0  # steps without drafts after the last wholly rejected draft (doubles each time)
    spec_skip: int = 0  # of those, steps still to go
    detokenizer: IncrementalDetokenizer | None = None  # None: no text is kept (model-free scheduler tests)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    output_text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    group: SequenceGroup | None = None  # beam search: the group that forks, prunes and extends this sequence
    pending_token_ids: list[int] = field(default_factory=list)  # appended by the group, not yet sent to the runner

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def update_block_hashes(self, block_size: int) -> list[int]:
        """Extend the hash chain to every full block of the tokens so far."""
        full = self.num_tokens // block_size
        if len(self.block_hashes) < full:
            parent = self.block_hashes[-1] if self.block_hashes else None
            start = len(self.block_hashes) * block_size
            self.block_hashes.extend(block_hashes(self.all_token_ids[start : full * block_size], block_size, parent))
        return self.block_hashes

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
