"""The proposer interface: after each step, draft tokens for the requests that sampled.

A proposer that runs a model keeps KV of its own (a draft model's cache) or writes into the target's
(layer skip), so it also sees every request of the step (to catch up on prompt chunks), the block copies
of forked sequences and the requests that left the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.worker.input_batch import CachedRequestState


@dataclass
class DraftRequest:
    """One request of the step, as the proposer sees it once the step's tokens are appended."""

    state: CachedRequestState  # prompt + outputs, this step's accepted tokens included; its block tables
    num_computed_tokens: int  # positions whose target KV was valid before the step
    num_verified_tokens: int  # positions whose target KV is valid after it (computed and not rejected)
    samples: bool  # it sampled this step and wants drafts


class Proposer:
    num_lookahead_tokens = 0
    """KV slots past the step's tokens the scheduler must allocate for the proposer to write into."""

    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        """Per request, up to k drafts ([] for requests that do not sample)."""
        raise NotImplementedError

    def remove_request(self, request_id: str) -> None:
        """The request finished or was preempted."""

    def copy_block(self, group: int, source: int, destination: int) -> None:
        """Copy-on-write of a forked sequence's block, mirrored in any KV the proposer keeps."""
