"""ModelRunner: SchedulerOutput -> one forward over the flattened batch -> sampled (and verified) tokens.

The runner keeps its own state of every request in the batch (input_batch.py), updated from each
SchedulerOutput: new requests once, then per step the computed count, block tables and drafts.

A request whose chunk reaches its end samples: with k draft tokens appended, its last k + 1 rows are
sampled at once, row j drawing the token at position N + j (N = the request's tokens) as a one-token
step would, with the tokens before it (drafts included) as history. Drafts are accepted while they equal
the row's sample; the first sample that differs (or the one after the last draft) is the next token.
With the sampling noise a function of (seed, position), this is lossless for deterministic drafts:
the tokens are exactly those of decoding without speculation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.engine.scheduler import ScheduledRequest, SchedulerOutput
from ember.kernels.gemv import gemv_module
from ember.models.base import CausalLM
from ember.outputs import PositionLogprobs
from ember.spec.proposer import DraftRequest, Proposer
from ember.worker.batch import ForwardBatch
from ember.worker.input_batch import CachedRequestState, InputBatch
from ember.worker.kv_cache import PagedKVCache
from ember.worker.logits_processors import LogitsProcessor
from ember.worker.runner_output import ModelRunnerOutput
from ember.worker.sampler import Sampler, SamplingRow, collect_logprobs


@dataclass
class _SampleGroup:
    """The logits rows one request (or a forked sibling) samples this step."""

    state: CachedRequestState
    drafts: list[int]
    first_row: int  # index of its first row in the sampled batch
    draft: bool  # propose drafts for the next step


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        device: torch.device | str,
        proposer: Proposer | None = None,
        processors: list[LogitsProcessor] | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self.sampler = Sampler(processors)
        self.proposer = proposer
        self.input_batch = InputBatch()
        if model.dtype == torch.bfloat16:
            gemv_module()  # build (or load) the decode kernel now, not during the first request

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(scheduled)
        for group, source, destination in scheduled.block_copies:
            self.kv_cache.copy_block(group, source, destination)
            if self.proposer is not None:
                self.proposer.copy_block(group, source, destination)
        batch, hidden_rows, logits_rows, groups = self._prepare(scheduled)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        output = ModelRunnerOutput()
        self._prompt_logprobs(scheduled, hidden, output)
        if not groups:
            return output
        logits = self.model.compute_logits(hidden[torch.tensor(hidden_rows, device=hidden.device)])
        if len(logits_rows) > logits.shape[0]:  # forked siblings share their parent's logits row
            logits = logits[torch.tensor(logits_rows, device=logits.device)]
        rows = [row for group in groups for row in _sampling_rows(group)]
        sampled = self.sampler(logits, rows)
        for group in groups:
            if group.state.num_candidates:  # a sequence-group member: its group picks the token
                output.add_row(group.state.request_id, [], None, [])
                output.candidates[group.state.request_id] = sampled.candidates[group.first_row]
                continue
            tokens, logprobs = _verify(group, sampled.token_ids, sampled.logprobs)
            group.state.output_token_ids.extend(tokens)
            for processor in self.sampler.processors:
                processor.accept(group.state.request_id, tokens)
            output.add_row(group.state.request_id, tokens, logprobs, [])
        self._propose(scheduled, groups, output)
        return output

    def _update_states(self, scheduled: SchedulerOutput) -> None:
        for forked in scheduled.forked:  # first: a parent may be dropped in the same step
            child = self.input_batch.fork_member(forked)
            for processor in self.sampler.processors:
                processor.add_request(child.request_id, child.params, child.output_token_ids)
        for request_id in scheduled.dropped_request_ids:
            self.input_batch.remove(request_id)
            if self.proposer is not None:
                self.proposer.remove_request(request_id)
            for processor in self.sampler.processors:
                processor.remove_request(request_id)
        for new in scheduled.new_requests:
            state = self.input_batch.add(new)
            for processor in self.sampler.processors:
                processor.add_request(state.request_id, state.params, state.output_token_ids)
        for item in scheduled.scheduled:
            self.input_batch.update(item)
            if item.new_token_ids:
                for processor in self.sampler.processors:
                    processor.accept(item.request_id, item.new_token_ids)

    def _prepare(
        self, scheduled: SchedulerOutput
    ) -> tuple[ForwardBatch, list[int], list[int], list[_SampleGroup]]:
        """Flatten the step's tokens; list the hidden rows that need logits and who samples from them."""
        input_ids: list[int] = []
        positions: list[int] = []
        hidden_rows: list[int] = []
        logits_rows: list[int] = []
        groups: list[_SampleGroup] = []
        states = [self.input_batch.states[item.request_id] for item in scheduled.scheduled]
        for item, state in zip(scheduled.scheduled, states):
            start, end = item.num_computed_tokens, item.num_computed_tokens + item.num_new_tokens
            input_ids.extend(state.token_ids(start, end, item.spec_token_ids))
            positions.extend(range(start, end))
            if not item.samples:
                continue
            count = len(item.spec_token_ids) + 1
            first_hidden = len(hidden_rows)
            hidden_rows.extend(range(len(input_ids) - count, len(input_ids)))
            groups.append(_SampleGroup(state, item.spec_token_ids, len(logits_rows), item.draft))
            logits_rows.extend(range(first_hidden, first_hidden + count))
            for fork in item.forks:
                child = self.input_batch.fork(state, fork)
                for processor in self.sampler.processors:
                    processor.add_request(child.request_id, child.params, child.output_token_ids)
                groups.append(_SampleGroup(child, [], len(logits_rows), item.draft))
                logits_rows.append(first_hidden)
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            start_positions=[item.num_computed_tokens for item in scheduled.scheduled],
            query_lens=[item.num_new_tokens for item in scheduled.scheduled],
            block_tables=[[item.block_ids[g] for item in scheduled.scheduled] for g in range(len(self.kv_cache.groups))],
            logits_indices=torch.tensor(hidden_rows, dtype=torch.long, device=self.device),
            kv_cache=self.kv_cache,
        )
        return batch, hidden_rows, logits_rows, groups

    def _propose(self, scheduled: SchedulerOutput, groups: list[_SampleGroup], output: ModelRunnerOutput) -> None:
        """Drafts for the requests that sampled and draft next (their rows come first, in output order):
        the proposer's, cut where a logits processor (a grammar) rejects them, or else the tokens a
        processor forces. Prompt chunks that did not reach their end come along for a draft model to keep up."""
        rows = [row for row, group in enumerate(groups) if group.draft]
        states = [groups[row].state for row in rows]
        proposed: list[list[int]] = [[] for _ in rows]
        if self.proposer is not None:
            requests = [DraftRequest(state, state.num_computed_tokens, state.num_tokens - 1, True) for state in states]
            for item in scheduled.scheduled:
                if not item.samples:
                    state = self.input_batch.states[item.request_id]
                    end = item.num_computed_tokens + item.num_new_tokens
                    requests.append(DraftRequest(state, item.num_computed_tokens, end, False))
            proposed = self.proposer.propose(requests)
        for row, state, drafts in zip(rows, states, proposed):
            output.spec_token_ids[row] = self._checked_drafts(state.request_id, drafts)

    def _checked_drafts(self, request_id: str, drafts: list[int]) -> list[int]:
        for processor in self.sampler.processors:
            drafts = drafts[: processor.valid_draft_prefix(request_id, drafts)]
        for processor in self.sampler.processors:
            if drafts:
                break
            drafts = processor.forced_tokens(request_id)
        return drafts

    def _prompt_logprobs(self, scheduled: SchedulerOutput, hidden: torch.Tensor, output: ModelRunnerOutput) -> None:
        """Log-probabilities of each prompt token given the ones before it (the first has none)."""
        offset = 0
        for item in scheduled.scheduled:
            state = self.input_batch.states[item.request_id]
            rows_offset, offset = offset, offset + item.num_new_tokens
            entries = _chunk_prompt_logprobs(self.model, state, item, hidden[rows_offset:offset])
            if entries is not None:
                output.prompt_logprobs[item.request_id] = entries


def _chunk_prompt_logprobs(
    model: CausalLM, state: CachedRequestState, item: ScheduledRequest, hidden: torch.Tensor
) -> list[PositionLogprobs | None] | None:
    k = state.params.prompt_logprobs
    start, prompt_len = item.num_computed_tokens, len(state.prompt_token_ids)
    if k is None or start >= prompt_len:
        return None
    # Position p predicts prompt token p + 1; the chunk's last row may predict past the prompt.
    last = min(start + item.num_new_tokens, prompt_len - 1)
    entries: list[PositionLogprobs | None] = [None] if start == 0 else []
    if last > start:
        logprobs = torch.log_softmax(model.compute_logits(hidden[: last - start]), -1)
        targets = torch.tensor(state.prompt_token_ids[start + 1 : last + 1], device=logprobs.device)
        entries.extend(collect_logprobs(logprobs, targets, [k] * len(targets)))
    return entries


def _sampling_rows(group: _SampleGroup) -> list[SamplingRow]:
    state = group.state
    return [
        SamplingRow(
            request_id=state.request_id,
            params=state.params,
            eos_token_ids=state.eos_token_ids,
            output_token_ids=state.output_token_ids + group.drafts[:j] if j else state.output_token_ids,
            seed=state.seed,
            position=state.num_tokens + j,
            prompt_token_ids=state.prompt_token_ids,
            num_candidates=state.num_candidates,
        )
        for j in range(len(group.drafts) + 1)
    ]


def _verify(
    group: _SampleGroup, sampled: list[int], logprobs: list[PositionLogprobs | None]
) -> tuple[list[int], list[PositionLogprobs] | None]:
    """Accept drafts while each equals the target's own sample at its position; then one sampled token."""
    first, drafts = group.first_row, group.drafts
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == sampled[first + accepted]:
        accepted += 1
    tokens = sampled[first : first + accepted + 1]
    entries = logprobs[first : first + accepted + 1]
    return tokens, (None if entries[0] is None else entries)  # type: ignore[return-value]
