"""The grammar logits processor: a matcher per constrained request (per sequence for n > 1), a token
bitmask filled per row each step and applied to the batch's logits in one kernel call.

Rows of a request verifying k drafts see the matcher advanced over the drafts before them, then rolled
back, so each row is masked as a one-token step at its position would be. Drafts are cut at the first
token the grammar rejects (`valid_draft_prefix`), before they are verified. A request that comes back
after preemption gets a new matcher that replays its output tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ember.kernels.token_mask import apply_token_bitmask
from ember.sampling_params import SamplingParams
from ember.structured.backend import StructuredOutputBackend
from ember.worker.logits_processors import LogitsProcessor, LogitsRow

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger("ember")


@dataclass
class _Constrained:
    matcher: xgrammar.GrammarMatcher
    num_accepted: int  # output tokens the matcher has consumed
    broken: bool = False  # a token the grammar rejects was appended (never under the mask); stop masking


class GrammarProcessor(LogitsProcessor):
    def __init__(self, backend: StructuredOutputBackend) -> None:
        self.backend = backend
        self._requests: dict[str, _Constrained] = {}
        self._bitmask = torch.empty(0, 0, dtype=torch.int32)

    def add_request(self, request_id: str, params: SamplingParams, output_token_ids: list[int]) -> None:
        if params.structured_outputs is None:
            return
        state = _Constrained(self.backend.matcher(params.structured_outputs), 0)
        self._requests[request_id] = state
        self._advance(request_id, state, output_token_ids)

    def remove_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def accept(self, request_id: str, token_ids: list[int]) -> None:
        state = self._requests.get(request_id)
        if state is not None:
            self._advance(request_id, state, token_ids)

    def valid_draft_prefix(self, request_id: str, draft_token_ids: list[int]) -> int:
        state = self._requests.get(request_id)
        if state is None or state.broken:
            return len(draft_token_ids)
        count = 0
        for token in draft_token_ids:
            if state.matcher.is_terminated() or not state.matcher.accept_token(token):
                break
            count += 1
        if count:
            state.matcher.rollback(count)
        return count

    def apply(self, logits: torch.Tensor, rows: list[LogitsRow]) -> torch.Tensor:
        constrained = [i for i, row in enumerate(rows) if row.request_id in self._requests]
        if not constrained:
            return logits
        bitmask = self._bitmask_for(len(constrained))
        masked: list[int] = []
        tentative: dict[str, int] = {}  # drafts accepted for later rows of the same request, rolled back below
        for i in constrained:
            row = rows[i]
            state = self._requests[row.request_id]
            if state.broken:
                continue
            ahead = tentative.get(row.request_id, 0)
            pending = row.output_token_ids[state.num_accepted + ahead :]
            if any(not state.matcher.accept_token(t) for t in pending):
                # Past a draft the grammar rejects: this row's token can never be kept, any mask will do.
                continue
            tentative[row.request_id] = ahead + len(pending)
            if state.matcher.is_terminated():
                continue
            state.matcher.fill_next_token_bitmask(bitmask, len(masked))
            masked.append(i)
        for request_id, count in tentative.items():
            if count:
                self._requests[request_id].matcher.rollback(count)
        apply_token_bitmask(logits, bitmask, masked)
        return logits

    def _advance(self, request_id: str, state: _Constrained, token_ids: list[int]) -> None:
        for token in token_ids:
            if state.broken or state.matcher.is_terminated():
                break
            if not state.matcher.accept_token(token):
                logger.warning("ember: request %s: token %d breaks its grammar; it is no longer masked", request_id, token)
                state.broken = True
            state.num_accepted += 1

    def _bitmask_for(self, rows: int) -> torch.Tensor:
        words = -(-self.backend.vocab_size // 32)
        if self._bitmask.shape[0] < rows or self._bitmask.shape[1] != words:
            self._bitmask = torch.empty(max(rows, 2 * self._bitmask.shape[0]), words, dtype=torch.int32)
        return self._bitmask
