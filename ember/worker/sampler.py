"""Batched sampling: every request's parameters applied as tensor ops over the [N, vocab] logits.

Randomness comes from each request's own generator (one uniform number per row, inverse-CDF
sampling), so a seeded request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.kernels.fused_ops import argmax
from ember.outputs import Logprob, PositionLogprobs


@dataclass
class SamplingRow:
    """What the sampler needs of one request that samples this step."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    generator: torch.Generator
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    suppressed_token_ids: list[int]  # eos/stop tokens while min_tokens is not reached
    num_logprobs: int | None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # decoded_token left None; the engine fills it
    cumulative_logprob_deltas: list[float | None]


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: float32 [N, vocab], one row per entry of `rows`."""
        wants_logprobs = [r.num_logprobs is not None for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(wants_logprobs) else None
        logits = _suppress(logits, rows)
        logits = _apply_penalties(logits, rows)
        tokens = self._choose(logits, rows)
        token_list = tokens.tolist()
        if raw_logprobs is None:
            return SamplerOutput(token_list, [None] * len(rows), [None] * len(rows))
        position_logprobs = _gather_logprobs(raw_logprobs, tokens, rows)
        deltas = [p[t].logprob if p is not None else None for p, t in zip(position_logprobs, token_list)]
        return SamplerOutput(token_list, position_logprobs, deltas)

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        greedy_tokens = argmax(logits)
        greedy = torch.tensor([r.temperature == 0.0 for r in rows], device=logits.device)
        if bool(greedy.all()):
            return greedy_tokens
        probs = _filtered_probs(logits, rows)
        uniforms = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(logits.device)
        cdf = probs.cumsum(dim=-1)
        sampled = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
        sampled = sampled.clamp_(max=logits.shape[-1] - 1)
        return torch.where(greedy, greedy_tokens, sampled)


def _suppress(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    pairs = [(i, t) for i, r in enumerate(rows) for t in r.suppressed_token_ids]
    if not pairs:
        return logits
    logits = logits.clone()
    index = torch.tensor(pairs, device=logits.device).T
    logits[index[0], index[1]] = float("-inf")
    return logits


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
    use_rep = any(r.repetition_penalty != 1.0 for r in rows)
    use_additive = any(r.presence_penalty != 0.0 or r.frequency_penalty != 0.0 for r in rows)
    if not (use_rep or use_additive):
        return logits
    vocab, device = logits.shape[-1], logits.device
    output_counts = _token_counts([r.output_token_ids for r in rows], vocab, device)
    if use_rep:
        seen = (_token_counts([r.prompt_token_ids for r in rows], vocab, device) + output_counts) > 0
        penalty = torch.tensor([r.repetition_penalty for r in rows], device=device).unsqueeze(-1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if use_additive:
        freq = torch.tensor([r.frequency_penalty for r in rows], device=device).unsqueeze(-1)
        presence = torch.tensor([r.presence_penalty for r in rows], device=device).unsqueeze(-1)
        logits = logits - freq * output_counts - presence * (output_counts > 0).float()
    return logits


def _filtered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, as probabilities (unnormalized is fine for the CDF)."""
    device = logits.device
    temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows], device=device)
    logits = logits / temps.unsqueeze(-1)
    top_ks = [r.top_k for r in rows]
    if any(k > 0 for k in top_ks):
        max_k = min(max(top_ks), logits.shape[-1])
        top_values = logits.topk(max_k, dim=-1).values
        kth = torch.tensor([min(k, max_k) - 1 if k > 0 else 0 for k in top_ks], device=device)
        threshold = top_values.gather(1, kth.unsqueeze(-1))
        no_limit = torch.tensor([k <= 0 for k in top_ks], device=device).unsqueeze(-1)
        logits = logits.masked_fill(~no_limit & (logits < threshold), float("-inf"))
    probs = logits.softmax(dim=-1)
    min_ps = torch.tensor([r.min_p for r in rows], device=device).unsqueeze(-1)
    if bool((min_ps > 0).any()):
        probs = probs.masked_fill(probs < min_ps * probs.max(dim=-1, keepdim=True).values, 0.0)
    top_ps = torch.tensor([r.top_p for r in rows], device=device).unsqueeze(-1)
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
