"""ModelRunner: SchedulerOutput -> one forward over the flattened batch -> sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ember.engine.request import Request
from ember.kernels.gemv import gemv_module
from ember.engine.scheduler import SchedulerOutput
from ember.models.base import CausalLM
from ember.outputs import PositionLogprobs
from ember.worker.batch import ForwardBatch
from ember.worker.kv_cache import PagedKVCache
from ember.worker.sampler import Sampler, SamplingRow, collect_logprobs


@dataclass
class ModelRunnerOutput:
    """Per request id: the sampled token, its logprobs, and prompt logprobs of this step's chunk."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, PositionLogprobs | None] = field(default_factory=dict)
    logprob_deltas: dict[str, float | None] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs | None]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: PagedKVCache, device: torch.device | str) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self.sampler = Sampler()
        if model.dtype == torch.bfloat16:
            gemv_module()  # build (or load) the decode kernel now, not during the first request

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        for group, source, destination in scheduled.block_copies:
            self.kv_cache.copy_block(group, source, destination)
        batch, sampling, logits_rows = self._prepare(scheduled)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        output = ModelRunnerOutput()
        self._prompt_logprobs(scheduled, hidden, output)
        if not sampling:
            return output
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        if len(logits_rows) > logits.shape[0]:  # n > 1 siblings share their parent's logits row
            logits = logits[torch.tensor(logits_rows, device=logits.device)]
        rows = [_sampling_row(r) for r in sampling]
        sampled = self.sampler(logits, rows)
        for i, request in enumerate(sampling):
            output.sampled_token_ids[request.request_id] = sampled.token_ids[i]
            output.logprobs[request.request_id] = sampled.logprobs[i]
            output.logprob_deltas[request.request_id] = sampled.cumulative_logprob_deltas[i]
        return output

    def _prepare(self, scheduled: SchedulerOutput) -> tuple[ForwardBatch, list[Request], list[int]]:
        """Flatten the step's tokens; list the requests that sample and, for each, its logits row."""
        input_ids: list[int] = []
        positions: list[int] = []
        hidden_rows: list[int] = []
        sampling: list[Request] = []
        logits_rows: list[int] = []
        for item in scheduled.scheduled:
            request, start = item.request, item.request.num_computed_tokens
            input_ids.extend(request.all_token_ids[start : start + item.num_new_tokens])
            positions.extend(range(start, start + item.num_new_tokens))
            if item.samples:
                hidden_rows.append(len(input_ids) - 1)
                for sampler in [request, *item.fork_children]:
                    sampling.append(sampler)
                    logits_rows.append(len(hidden_rows) - 1)
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            start_positions=[s.request.num_computed_tokens for s in scheduled.scheduled],
            query_lens=[s.num_new_tokens for s in scheduled.scheduled],
            block_tables=[[s.block_tables[g] for s in scheduled.scheduled] for g in range(len(self.kv_cache.groups))],
            logits_indices=torch.tensor(hidden_rows, dtype=torch.long, device=self.device),
            kv_cache=self.kv_cache,
        )
        return batch, sampling, logits_rows

    def _prompt_logprobs(self, scheduled: SchedulerOutput, hidden: torch.Tensor, output: ModelRunnerOutput) -> None:
        """Log-probabilities of each prompt token given the ones before it (the first has none)."""
        offset = 0
        for item in scheduled.scheduled:
            request, start, count = item.request, item.request.num_computed_tokens, item.num_new_tokens
            rows_offset, offset = offset, offset + count
            k = request.params.prompt_logprobs
            if k is None or start >= request.num_prompt_tokens:
                continue
            # Position p predicts prompt token p + 1; the chunk's last row may predict past the prompt.
            last = min(start + count, request.num_prompt_tokens - 1)
            entries: list[PositionLogprobs | None] = [None] if start == 0 else []
            if last > start:
                logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows_offset : rows_offset + last - start]), -1)
                targets = torch.tensor(request.prompt_token_ids[start + 1 : last + 1], device=logprobs.device)
                entries.extend(collect_logprobs(logprobs, targets, [k] * len(targets)))
            output.prompt_logprobs[request.request_id] = entries


def _sampling_row(request: Request) -> SamplingRow:
    params = request.params
    suppressed: list[int] = []
    if len(request.output_token_ids) < params.min_tokens:
        suppressed = list(dict.fromkeys(params.stop_token_ids + ([] if params.ignore_eos else request.eos_token_ids)))
    return SamplingRow(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        generator=request.generator,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=request.output_token_ids,
        suppressed_token_ids=suppressed,
        num_logprobs=params.logprobs,
    )
