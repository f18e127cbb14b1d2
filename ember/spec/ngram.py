"""Prompt lookup (n-gram) drafts: find the latest earlier occurrence of the text's last n tokens and
propose the tokens that followed it. Costs no model call, so it pays on copy-heavy text (code edits,
summaries, RAG answers quoting their sources)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ember.spec.proposer import DraftRequest, Proposer


class NgramProposer(Proposer):
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.k = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        return [
            self.propose_one(r.state.prompt_token_ids + r.state.output_token_ids) if r.samples else []
            for r in requests
        ]

    def propose_one(self, tokens: list[int]) -> list[int]:
        """Longest suffix match first (n from max down to min); of its matches, the latest one followed
        by k tokens (in a run of one repeated token the latest match has a single follower)."""
        length = len(tokens)
        if length < self.min_n + 1:
            return []
        array = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # Windows starting at i < length - n, so a match is never the suffix itself and has a follower.
            windows = sliding_window_view(array[: length - 1], n)
            matches = np.flatnonzero((windows == array[length - n :]).all(axis=1))
            if matches.size:
                full = matches[matches + n + self.k <= length]
                start = int(full[-1] if full.size else matches[0]) + n
                return array[start : start + self.k].tolist()
        return []
