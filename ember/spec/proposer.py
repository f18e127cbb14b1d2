"""The proposer interface: after a step, draft tokens for each request that sampled."""

from __future__ import annotations

from typing import Protocol

from ember.worker.input_batch import CachedRequestState


class Proposer(Protocol):
    def propose(self, states: list[CachedRequestState]) -> list[list[int]]:
        """Per request (its prompt + outputs so far, the newest token included): up to k drafts."""
        ...
