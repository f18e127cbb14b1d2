"""Early stopping of parallel samples: stop all k samples once m have finished.

m = 1 is First Finish Search (return the first sample to finish); m > 1 is short-m@k from "Don't Overthink
It" (vote among the first m). Both rest on the same observation: among parallel samples of one prompt the
shorter ones are more often right, and the long tail costs the most tokens. A sample counts as finished
when it ends on its own, at a stop or at the length limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput


@dataclass(frozen=True)
class EarlyStop:
    m: int
    """Finished samples to wait for; the others are aborted then."""

    def __post_init__(self) -> None:
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1:
            raise InvalidRequestError(f"early stop: m must be a positive integer, got {self.m!r}")

    def check(self, k: int) -> None:
        if self.m > k:
            raise InvalidRequestError(f"early stop: m ({self.m}) must not exceed the number of samples k ({k})")

    def reached(self, completions: list[CompletionOutput]) -> bool:
        return sum(c.finished() for c in completions) >= self.m

    def keep(self, finished: list[CompletionOutput]) -> list[CompletionOutput]:
        """The m that finished first. Samples that finish in the same step tie (in one request all samples
        advance together, so they also have the same length); the lower index wins, so the choice is
        deterministic."""
        return sorted(finished, key=lambda c: (len(c.token_ids), c.index))[: self.m]


FIRST_FINISH = EarlyStop(1)  # First Finish Search; EarlyStop(m) is short-m@k
