"""Per-request changes to the logits, applied to the whole batch as tensor ops before sampling.

Each row of the batch's logits belongs to one request at one position (a step that verifies k drafts
has k + 1 rows for that request). A processor sees, per row, the request's parameters and the tokens
generated before that position (drafts before it included), so speculative verification gets exactly
the logits a one-token step would. Stateful processors (a grammar matcher) keep state per request and
advance it in `accept` with the tokens a step accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.sampling_params import SamplingParams


@dataclass
class LogitsRow:
    request_id: str
    params: SamplingParams
    eos_token_ids: list[int]
    output_token_ids: list[int]  # generated before this row's position (accepted + earlier drafts)


class LogitsProcessor:
    """Interface; the default hooks do nothing."""

    def add_request(self, request_id: str, params: SamplingParams, output_token_ids: list[int]) -> None:
        """A request enters the runner's batch (first admission, resumed, or forked)."""

    def remove_request(self, request_id: str) -> None:
        """A request left the batch (finished, aborted or preempted)."""

    def accept(self, request_id: str, token_ids: list[int]) -> None:
        """A step appended these tokens to the request."""

    def valid_draft_prefix(self, request_id: str, draft_token_ids: list[int]) -> int:
        """How many of these drafts (after the request's tokens) the processor could ever let through; the
        rest are dropped before verification (e.g. the grammar rejects them)."""
        return len(draft_token_ids)

    def forced_tokens(self, request_id: str) -> list[int]:
        """Tokens that must come next whatever the model says (a grammar's only continuation), proposed as
        drafts when nothing else drafts for the request; [] when there are none."""
        return []

    def apply(self, logits: torch.Tensor, rows: list[LogitsRow]) -> torch.Tensor:
        """logits: [len(rows), vocab] float32; returns the changed logits (may be the same tensor)."""
        raise NotImplementedError


class MinTokensProcessor(LogitsProcessor):
    """EOS and stop token ids get -inf until `min_tokens` tokens are generated."""

    def apply(self, logits: torch.Tensor, rows: list[LogitsRow]) -> torch.Tensor:
        pairs = [
            (i, token)
            for i, row in enumerate(rows)
            if len(row.output_token_ids) < row.params.min_tokens
            for token in _stop_ids(row)
        ]
        if not pairs:
            return logits
        index = torch.tensor(pairs, device=logits.device).T
        logits[index[0], index[1]] = float("-inf")
        return logits


class LogitBiasProcessor(LogitsProcessor):
    """vLLM / OpenAI logit_bias: the bias is added to the token's logit (ids checked against the
    vocabulary when the request is added)."""

    def apply(self, logits: torch.Tensor, rows: list[LogitsRow]) -> torch.Tensor:
        triples = [(i, token, bias) for i, row in enumerate(rows) for token, bias in (row.params.logit_bias or {}).items()]
        if not triples:
            return logits
        index = torch.tensor([t[:2] for t in triples], device=logits.device).T
        biases = torch.tensor([t[2] for t in triples], dtype=logits.dtype, device=logits.device)
        logits.index_put_((index[0], index[1]), biases, accumulate=True)
        return logits


def default_processors() -> list[LogitsProcessor]:
    return [MinTokensProcessor(), LogitBiasProcessor()]


def _stop_ids(row: LogitsRow) -> list[int]:
    eos = [] if row.params.ignore_eos else row.eos_token_ids
    return list(dict.fromkeys(row.params.stop_token_ids + eos))
