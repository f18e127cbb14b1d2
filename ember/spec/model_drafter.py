"""Drafts from a model: a smaller model with the same vocabulary (`draft_model`), or the target itself
with some of its layers skipped (`layer_skip`, as in SWIFT and Draft & Verify).

Drafting is greedy (the draft's argmax), so drafts are deterministic and verification stays lossless;
it stops early when the draft's top probability falls below `p_min` (llama.cpp's draft p-min): a token
the draft is unsure of is likely rejected, and each draft token costs a draft forward plus a verified row.

After a step, each request that sampled feeds the tokens its draft KV lacks (normally just the newest
token; a whole prompt chunk for a draft model's first step) in one batched forward, then one token per
further draft. Draft KV positions past the verified tokens are written into slots the scheduler
allocated ahead (`num_lookahead_tokens`); a rejected draft's slot is overwritten later, never read.

- draft_model keeps its own paged KV cache on the target's block tables (full-attention group): the same
  block ids, so allocation, prefix-cache hits, truncation and preemption apply to both at once.
- layer_skip writes into the target's own cache, in the layers it runs, and only at positions the target
  has not computed yet (the verification step then overwrites them with the real values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.models.base import CausalLM
from ember.spec.proposer import DraftRequest, Proposer
from ember.worker.batch import ForwardBatch
from ember.worker.kv_cache import PagedKVCache

MAX_CATCH_UP = 512  # most tokens one request feeds the draft model in one step


@dataclass
class _Drafting:
    """One request being drafted for: where its next token goes and how many drafts it may still take."""

    index: int  # in the step's request list
    tables: list[list[int]]
    position: int  # of the last token fed
    remaining: int


class ModelDrafter(Proposer):
    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        num_speculative_tokens: int,
        p_min: float,
        vocab_size: int,
        own_cache: bool,
        skip_layers: frozenset[int] = frozenset(),
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.k = num_speculative_tokens
        self.num_lookahead_tokens = num_speculative_tokens
        self.p_min = p_min
        self.vocab_size = vocab_size  # the target's: a draft id past it could never be accepted
        self.own_cache = own_cache
        self.skip_layers = skip_layers
        self.device = kv_cache.keys[0].device
        self._computed: dict[str, int] = {}  # own cache: leading positions whose draft KV is valid

    def remove_request(self, request_id: str) -> None:
        self._computed.pop(request_id, None)

    def copy_block(self, group: int, source: int, destination: int) -> None:
        if self.own_cache and group == 0:
            self.kv_cache.copy_block(0, source, destination)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        feeds: list[tuple[int, int, int]] = []  # (request index, first position, end)
        for index, request in enumerate(requests):
            state = request.state
            if not state.block_ids:  # a sibling forked this step: its blocks come with the next step
                continue
            capacity = len(state.block_ids[0]) * self.kv_cache.block_size
            start = request.num_verified_tokens
            if self.own_cache:
                start = min(self._computed.get(state.request_id, request.num_computed_tokens), start)
            # A draft model that has fallen behind (drafting was off) catches up a bounded chunk per step.
            end = state.num_tokens if request.samples else request.num_verified_tokens
            end = min(end, capacity, start + MAX_CATCH_UP)
            if end > start:
                feeds.append((index, start, end))
        if not feeds:
            return drafts
        drafting = self._catch_up(requests, feeds, drafts)
        while drafting:
            drafting = self._step(requests, drafting, drafts)
        return drafts

    def _catch_up(
        self, requests: list[DraftRequest], feeds: list[tuple[int, int, int]], drafts: list[list[int]]
    ) -> list[_Drafting]:
        """Feed each request the tokens its draft KV lacks; the ones that sampled take their first draft."""
        input_ids: list[int] = []
        last_rows: list[int] = []
        candidates: list[_Drafting] = []
        for index, start, end in feeds:
            state = requests[index].state
            input_ids.extend(state.token_ids(start, end, []))
            if self.own_cache:
                self._computed[state.request_id] = end
            room = len(state.block_ids[0]) * self.kv_cache.block_size - end  # slots for further fed drafts
            if requests[index].samples and end == state.num_tokens:
                last_rows.append(len(input_ids) - 1)
                candidates.append(_Drafting(index, self._tables(state.block_ids), end - 1, min(self.k, room + 1)))
        batch = self._batch(
            input_ids,
            [p for _, start, end in feeds for p in range(start, end)],
            [start for _, start, _ in feeds],
            [end - start for _, start, end in feeds],
            [self._tables(requests[index].state.block_ids) for index, _, _ in feeds],
            last_rows,
        )
        return self._take(self._forward(batch, last_rows), candidates, drafts)

    def _step(
        self, requests: list[DraftRequest], drafting: list[_Drafting], drafts: list[list[int]]
    ) -> list[_Drafting]:
        """Feed each request its newest draft (one token each) and take the next."""
        for item in drafting:
            item.position += 1
        rows = list(range(len(drafting)))
        batch = self._batch(
            [drafts[item.index][-1] for item in drafting],
            [item.position for item in drafting],
            [item.position for item in drafting],
            [1] * len(drafting),
            [item.tables for item in drafting],
            rows,
        )
        if self.own_cache:
            for item in drafting:
                self._computed[requests[item.index].state.request_id] = item.position + 1
        return self._take(self._forward(batch, rows), drafting, drafts)

    def _take(
        self, top: tuple[list[float], list[int]], drafting: list[_Drafting], drafts: list[list[int]]
    ) -> list[_Drafting]:
        """Append each request's confident draft token; keep the ones that may draft again."""
        still = []
        for item, probability, token in zip(drafting, *top):
            if probability < self.p_min:
                continue
            drafts[item.index].append(token)
            item.remaining -= 1
            if item.remaining > 0:
                still.append(item)
        return still

    def _forward(self, batch: ForwardBatch, rows: list[int]) -> tuple[list[float], list[int]]:
        """Top probability and token of the rows that draft."""
        hidden = self.model(batch.input_ids, batch.positions, batch)
        if not rows:
            return [], []
        logits = self.model.compute_logits(hidden[batch.logits_indices])[:, : self.vocab_size]
        probability, token = torch.softmax(logits, -1).max(-1)
        return probability.tolist(), token.tolist()

    def _tables(self, block_ids: list[list[int]]) -> list[list[int]]:
        """The request's block tables as the draft's cache sees them."""
        return [block_ids[0]] if self.own_cache else block_ids

    def _batch(
        self,
        input_ids: list[int],
        positions: list[int],
        start_positions: list[int],
        query_lens: list[int],
        tables: list[list[list[int]]],
        rows: list[int],
    ) -> ForwardBatch:
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            start_positions=start_positions,
            query_lens=query_lens,
            block_tables=[[t[g] for t in tables] for g in range(len(self.kv_cache.groups))],
            logits_indices=torch.tensor(rows, dtype=torch.long, device=self.device),
            kv_cache=self.kv_cache,
            skip_layers=self.skip_layers,
        )
