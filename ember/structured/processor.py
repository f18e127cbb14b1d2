"""The grammar logits processor: a matcher per constrained request (per sequence for n > 1), a token
bitmask filled per row each step and applied to the batch's logits in one kernel call.

Rows of a request verifying k drafts see the matcher advanced over the drafts before them, then rolled
back, so each row is masked as a one-token step at its position would be. Drafts are cut at the first
token the grammar rejects (`valid_draft_prefix`), before they are verified; where nothing else drafts, the
text the grammar forces next is proposed as drafts (jump-forward). A request that comes back
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

_MAX_FORCED_TOKENS = 16  # jump-forward drafts per step (one verification forward)


@dataclass
class _Constrained:
    matcher: xgrammar.GrammarMatcher
    num_accepted: int  # output tokens the matcher has consumed
    broken: bool = False  # a token the grammar rejects was appended (never under the mask); stop masking


class GrammarProcessor(LogitsProcessor):
    def __init__(self, backend: StructuredOutputBackend, jump_forward: bool = True) -> None:
        self.backend = backend
        self.jump_forward = jump_forward
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

    def forced_tokens(self, request_id: str) -> list[int]:
        """Jump-forward: the text the grammar forces next (e.g. `", "age": ` between two JSON fields),
        as tokens, proposed as drafts. The model verifies them like any draft, so the output is what it
        would be without them; a step then yields several tokens where they agree with the model's own."""
        state = self._requests.get(request_id)
        if not self.jump_forward or state is None or state.broken or state.matcher.is_terminated():
            return []
        # Longest vocabulary tokens over the forced text, the last left out when a longer token could
        # start there (the model would likely merge it with what follows).
        tokens = state.matcher.find_jump_forward_tokens()[:_MAX_FORCED_TOKENS]
        return tokens[: self.valid_draft_prefix(request_id, tokens)]

    def apply(self, logits: torch.Tensor, rows: list[LogitsRow]) -> torch.Tensor:
        constrained = [i for i, row in enumerate(rows) if row.request_id in self._requests]
        if not constrained:
            return logits
        bitmask = self._bitmask_for(len(constrained))
        masked: list[int] = []
        tentative: dict[str, int] = {}  # drafts accepted for later rows of the same request, rolled back below
        rejected: set[str] = set()  # requests whose drafts the grammar rejects from some row on
        for i in constrained:
            row = rows[i]
            state = self._requests[row.request_id]
            if state.broken or row.request_id in rejected:
                continue
            ahead = tentative.get(row.request_id, 0)
            pending = row.output_token_ids[state.num_accepted + ahead :]
            accepted = 0
            while accepted < len(pending) and state.matcher.accept_token(pending[accepted]):
                accepted += 1
            tentative[row.request_id] = ahead + accepted
            if accepted < len(pending):
                # Past a draft the grammar rejects: these rows' tokens can never be kept, any mask will do.
                rejected.add(row.request_id)
                continue
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
