"""ModelRunnerOutput: what one model step produced, as plain data (the runner may live in another process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.engine.beam_search import Candidates
from ember.outputs import PositionLogprobs


@dataclass
class ModelRunnerOutput:
    """One row per request that sampled: the scheduled ones, then the n > 1 siblings forked this step."""

    request_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[list[int]] = field(default_factory=list)  # accepted drafts + one sampled token
    logprobs: list[list[PositionLogprobs] | None] = field(default_factory=list)  # per sampled token
    spec_token_ids: list[list[int]] = field(default_factory=list)  # drafts proposed for the next step
    prompt_logprobs: dict[str, list[PositionLogprobs | None]] = field(default_factory=dict)  # this chunk's
    candidates: dict[str, Candidates] = field(default_factory=dict)  # group members: their next-token candidates
    _rows: dict[str, int] = field(default_factory=dict, repr=False)

    def add_row(
        self, request_id: str, tokens: list[int], logprobs: list[PositionLogprobs] | None, drafts: list[int]
    ) -> None:
        self._rows[request_id] = len(self.request_ids)
        self.request_ids.append(request_id)
        self.sampled_token_ids.append(tokens)
        self.logprobs.append(logprobs)
        self.spec_token_ids.append(drafts)

    def row_of(self, request_id: str) -> int | None:
        return self._rows.get(request_id)
