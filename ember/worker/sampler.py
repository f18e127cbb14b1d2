"""Batched sampling: every request's parameters applied as tensor ops over the [N, vocab] logits.

Randomness is one uniform number per (request seed, position) (worker/sampling_noise.py), used for
inverse-CDF sampling, so a seeded request draws the same tokens whatever else shares its batch and
whether or not a draft proposed them. Logits processors (min_tokens, logit_bias, ...) run first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.engine.beam_search import Candidates
from ember.kernels.fused_ops import argmax
from ember.outputs import Logprob, PositionLogprobs
from ember.worker.logits_processors import LogitsProcessor, LogitsRow, default_processors
from ember.worker.sampling_noise import position_uniform


@dataclass
class SamplingRow(LogitsRow):
    """One row of logits to sample: a request at one position."""

    seed: int = 0
    position: int = 0  # index in prompt + output of the token this row draws
    prompt_token_ids: list[int] | None = None
    num_candidates: int = 0  # > 0: also return the top tokens of the processed distribution (beam search)

    @property
    def temperature(self) -> float:
        return self.params.temperature

    @property
    def num_logprobs(self) -> int | None:
        return self.params.logprobs


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # decoded_token left None; the engine fills it
    cumulative_logprob_deltas: list[float | None]
    candidates: list[Candidates | None]


class Sampler:
    def __init__(self, processors: list[LogitsProcessor] | None = None) -> None:
        self.processors = default_processors() if processors is None else processors

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: float32 [N, vocab], one row per entry of `rows` (changed in place)."""
        wants_logprobs = [r.num_logprobs is not None for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(wants_logprobs) else None
        logits = self.process(logits, rows)
        candidates = _candidates(logits, rows)
        tokens = self._choose(logits, rows)
        token_list = tokens.tolist()
        if raw_logprobs is None:
            return SamplerOutput(token_list, [None] * len(rows), [None] * len(rows), candidates)
        position_logprobs = _gather_logprobs(raw_logprobs, tokens, rows)
        deltas = [p[t].logprob if p is not None else None for p, t in zip(position_logprobs, token_list)]
        return SamplerOutput(token_list, position_logprobs, deltas, candidates)

    def process(self, logits: torch.Tensor, rows: list[LogitsRow]) -> torch.Tensor:
        """The logits a row's token is chosen from: the logits processors' changes, then the penalties'."""
        for processor in self.processors:
            logits = processor.apply(logits, rows)
        return _apply_penalties(logits, rows)  # type: ignore[arg-type]

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        greedy_tokens = argmax(logits)
        greedy = torch.tensor([r.temperature == 0.0 for r in rows], device=logits.device)
        if bool(greedy.all()):
            return greedy_tokens
        sampled, _ = inverse_cdf(filtered_probs(logits, rows), row_uniforms(rows, logits.device))
        return torch.where(greedy, greedy_tokens, sampled)


def row_uniforms(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """Each row's sampling noise: the one uniform of its (seed, position)."""
    return torch.tensor([position_uniform(r.seed, r.position) for r in rows], dtype=torch.float64, device=device)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first token whose cumulative probability reaches u times the row's total, and the
    cumulative sums [N, vocab] it was read from (unnormalized)."""
    cdf = probs.cumsum(dim=-1)
    sampled = torch.searchsorted(cdf, (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return sampled.clamp_(max=probs.shape[-1] - 1), cdf


def _candidates(logits: torch.Tensor, rows: list[SamplingRow]) -> list[Candidates | None]:
    """For rows that want them: the top tokens of log_softmax(processed logits / temperature), best first."""
    wanted = [i for i, r in enumerate(rows) if r.num_candidates]
    result: list[Candidates | None] = [None] * len(rows)
    if not wanted:
        return result
    index = torch.tensor(wanted, device=logits.device)
    temps = torch.tensor([rows[i].temperature or 1.0 for i in wanted], device=logits.device).unsqueeze(-1)
    logprobs = torch.log_softmax(logits[index] / temps, dim=-1)
    top = logprobs.topk(min(max(rows[i].num_candidates for i in wanted), logits.shape[-1]), dim=-1)
    ids, values = top.indices.tolist(), top.values.tolist()
    for i, token_ids, row_logprobs in zip(wanted, ids, values):
        k = rows[i].num_candidates
        result[i] = Candidates(token_ids[:k], row_logprobs[:k])
    return result


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[N, vocab] occurrence counts; padding goes to an extra column that is dropped."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    if width == 0:
        return counts[:, :vocab]
    padded = torch.full((len(token_lists), width), vocab, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        padded[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """vLLM semantics: repetition over prompt + output tokens; presence/frequency over output only."""
    params = [r.params for r in rows]
    use_rep = any(p.repetition_penalty != 1.0 for p in params)
    use_additive = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    if not (use_rep or use_additive):
        return logits
    vocab, device = logits.shape[-1], logits.device
    output_counts = _token_counts([r.output_token_ids for r in rows], vocab, device)
    if use_rep:
        seen = (_token_counts([r.prompt_token_ids or [] for r in rows], vocab, device) + output_counts) > 0
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(-1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if use_additive:
        freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(-1)
        presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(-1)
        logits = logits - freq * output_counts - presence * (output_counts > 0).float()
    return logits


def filtered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, as probabilities (unnormalized is fine for the CDF)."""
    device = logits.device
    params = [r.params for r in rows]
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
    logits = logits / temps.unsqueeze(-1)
    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        max_k = min(max(top_ks), logits.shape[-1])
        top_values = logits.topk(max_k, dim=-1).values
        kth = torch.tensor([min(k, max_k) - 1 if k > 0 else 0 for k in top_ks], device=device)
        threshold = top_values.gather(1, kth.unsqueeze(-1))
        no_limit = torch.tensor([k <= 0 for k in top_ks], device=device).unsqueeze(-1)
        logits = logits.masked_fill(~no_limit & (logits < threshold), float("-inf"))
    probs = logits.softmax(dim=-1)
    min_ps = torch.tensor([p.min_p for p in params], device=device).unsqueeze(-1)
    if bool((min_ps > 0).any()):
        probs = probs.masked_fill(probs < min_ps * probs.max(dim=-1, keepdim=True).values, 0.0)
    top_ps = torch.tensor([p.top_p for p in params], device=device).unsqueeze(-1)
    if bool((top_ps < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        total = sorted_probs.sum(dim=-1, keepdim=True)
        sorted_probs = sorted_probs.masked_fill(mass_before > top_ps * total, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return probs


def _gather_logprobs(raw: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]) -> list[PositionLogprobs | None]:
    wanted = [i for i, r in enumerate(rows) if r.num_logprobs is not None]
    index = torch.tensor(wanted, device=raw.device)
    collected = collect_logprobs(raw[index], tokens[index], [rows[i].num_logprobs or 0 for i in wanted])
    result: list[PositionLogprobs | None] = [None] * len(rows)
    for i, entry in zip(wanted, collected):
        result[i] = entry
    return result


def collect_logprobs(logprobs: torch.Tensor, targets: torch.Tensor, num_top: list[int]) -> list[PositionLogprobs]:
    """Per row: the target token's logprob and rank, plus the row's top `num_top[i]` tokens."""
    chosen = logprobs.gather(1, targets.unsqueeze(-1))
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    chosen_list = chosen.squeeze(-1).tolist()
    max_k = max(num_top, default=0)
    top = logprobs.topk(max_k, dim=-1) if max_k > 0 else None
    result: list[PositionLogprobs] = []
    for i, target in enumerate(targets.tolist()):
        entry = {target: Logprob(chosen_list[i], ranks[i])}
        if top is not None:
            ids, values = top.indices[i, : num_top[i]].tolist(), top.values[i, : num_top[i]].tolist()
            for rank, (token_id, value) in enumerate(zip(ids, values), 1):
                entry.setdefault(token_id, Logprob(value, rank))
        result.append(entry)
    return result
