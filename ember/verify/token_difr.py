"""Token-DiFR (after "DiFR: Inference Verification Despite Nondeterminism"): score claimed output tokens
against the reference model's own sample under the same sampling noise.

The reference model is teacher-forced on prompt + claimed output (a private KV cache). At
each output position the logits go through exactly what ember's sampler does at that position (logits
processors, penalties, temperature, top-k, min-p, top-p; worker/sampler.py) and the reference's sample is
drawn with the very uniform ember's sampler would draw for that (seed, position) (worker/sampling_noise.py).
Per claimed token:
- exact: it is the reference's sample;
- margin: how far it is from being that sample. Sampled tokens (temperature > 0): the probability mass
  between u and the claimed token's interval of the cumulative distribution (token t owns the interval
  (C(t-1), C(t)] of the normalized cumulative sums over token ids; the reference's sample owns the one
  holding u), so 0 for the reference's sample and at most 1. Greedy: the log-probability gap (nats) to the
  argmax. Infinite when the token could not have been drawn at all: zero probability after filtering (outside
  top-k / top-p / min-p, an EOS before min_tokens), after a stop token, or past max_tokens.
An honest engine with slightly different arithmetic misses the reference's sample only where u falls within
that difference of an interval's edge, so its mismatches are rare and their margins tiny; a different model,
quantization or temperature moves the intervals by more. Stop strings are not checked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequestError
from ember.kernels.fused_ops import argmax
from ember.verify.claims import Claim
from ember.worker.batch import ForwardBatch
from ember.worker.kv_cache import PagedKVCache
from ember.worker.logits_processors import default_processors
from ember.worker.sampler import Sampler, SamplingRow, filtered_probs, inverse_cdf, row_uniforms

# A margin counted in a divergence score is clipped here (an impossible token counts as this much).
DEFAULT_CLIP = 1.0


@dataclass
class ClaimResult:
    claim_id: str | None
    reference_token_ids: list[int]  # the reference's sample at each claimed position
    exact: list[bool]
    margins: list[float]  # 0 where exact; math.inf where impossible

    @property
    def num_tokens(self) -> int:
        return len(self.exact)

    @property
    def exact_match_rate(self) -> float:
        return sum(self.exact) / len(self.exact)

    @property
    def mean_margin(self) -> float:
        """Mean of the finite margins (0 when every token is impossible)."""
        return _finite_mean(self.margins)

    @property
    def impossible_rate(self) -> float:
        return sum(1 for m in self.margins if math.isinf(m)) / len(self.margins)

    def divergence(self, num_tokens: int | None = None, clip: float = DEFAULT_CLIP) -> float:
        """The claim's score for telling configurations apart: the mean margin over its first `num_tokens`
        tokens, each clipped to `clip` (an impossible token counts `clip`)."""
        margins = self.margins[:num_tokens] if num_tokens is not None else self.margins
        return sum(min(m, clip) for m in margins) / len(margins)

    def to_dict(self) -> dict:
        return {
            "id": self.claim_id, "num_tokens": self.num_tokens, "exact_match_rate": self.exact_match_rate,
            "mean_margin": self.mean_margin, "impossible_rate": self.impossible_rate,
            "margins": [m if math.isfinite(m) else "inf" for m in self.margins],
            "reference_token_ids": self.reference_token_ids,
        }  # fmt: skip


@dataclass
class VerifyReport:
    claims: list[ClaimResult]
    seconds: float
    aggregate: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        margins = [m for c in self.claims for m in c.margins]
        self.aggregate = {
            "num_claims": len(self.claims),
            "num_tokens": len(margins),
            "exact_match_rate": sum(sum(c.exact) for c in self.claims) / max(1, len(margins)),
            "mean_margin": _finite_mean(margins),
            "impossible_rate": sum(1 for m in margins if math.isinf(m)) / max(1, len(margins)),
            "seconds": self.seconds,
            "tokens_per_second": len(margins) / self.seconds if self.seconds > 0 else 0.0,
        }

    def to_dict(self) -> dict:
        return {**self.aggregate, "claims": [c.to_dict() for c in self.claims]}


class TokenVerifier:
    """Verifies claims against an engine's model (its weights, dtype, quantization and KV-cache dtype are
    the reference). Use it between engine steps (it runs the engine's model, with a KV cache of its own).

    The teacher-forced forward has the shapes of generation, not one long prefill: each claim's prompt is
    prefilled as the engine prefills it (in chunks of max_num_batched_tokens), then the claimed tokens go
    in one decode step per token, the claims of a batch together. So the logits are the ones ember computed
    when it generated the claim wherever ember's outputs do not depend on the step's shape (float32 today;
    see docs/verification.md), and a single long prefill's different rounding cannot turn an honest token
    into a mismatch."""

    def __init__(self, engine: LLMEngine, batch_size: int = 8) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidRequestError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.engine = engine
        self.batch_size = batch_size
        self.sampler = Sampler(default_processors())

    def verify(self, claim: Claim) -> ClaimResult:
        return self.verify_batch([claim])[0]

    def verify_all(self, claims: Sequence[Claim], progress: bool = False) -> VerifyReport:
        start = time.perf_counter()
        results: list[ClaimResult] = []
        with tqdm(total=sum(len(c.output_token_ids) for c in claims), desc="verify", unit="tok",
                  disable=not progress) as bar:  # fmt: skip
            for first in range(0, len(claims), self.batch_size):
                batch = claims[first : first + self.batch_size]
                results += self.verify_batch(batch)
                bar.update(sum(len(c.output_token_ids) for c in batch))
        return VerifyReport(results, time.perf_counter() - start)

    @torch.inference_mode()
    def verify_batch(self, claims: Sequence[Claim]) -> list[ClaimResult]:
        """Claims teacher-forced together (at most batch_size of them is the intent)."""
        engine = self.engine
        for claim in claims:
            length = len(claim.prompt_token_ids) + len(claim.output_token_ids)
            if length > engine.max_model_len:
                raise InvalidRequestError(
                    f"claim of {len(claim.prompt_token_ids)} prompt + {len(claim.output_token_ids)} output tokens "
                    f"exceeds the model's context (max_model_len) of {engine.max_model_len} tokens"
                )
        cache, tables = engine.runner.kv_cache.scratch_for(
            [len(c.prompt_token_ids) + len(c.output_token_ids) for c in claims]
        )
        reference: list[list[int]] = [[] for _ in claims]
        margins: list[list[float]] = [[] for _ in claims]

        # Output token 0 comes from the prompt's last row, each prompt prefilled on its own.
        chunk = engine.config.max_num_batched_tokens
        last_rows = []
        for b, claim in enumerate(claims):
            prompt = claim.prompt_token_ids
            for start in range(0, len(prompt), chunk):
                hidden = self._forward([prompt[start : start + chunk]], [start], [tables[b]], cache)
            last_rows.append(engine.runner.model.compute_logits(hidden[-1:]))
        self._score(torch.cat(last_rows), claims, [0] * len(claims), reference, margins)

        # Then one decode step per claimed token, every claim that still has one in the step.
        for j in range(1, max(len(c.output_token_ids) for c in claims)):
            active = [b for b, c in enumerate(claims) if len(c.output_token_ids) > j]
            hidden = self._forward(
                [[claims[b].output_token_ids[j - 1]] for b in active],
                [len(claims[b].prompt_token_ids) + j - 1 for b in active], [tables[b] for b in active], cache,
            )  # fmt: skip
            logits = engine.runner.model.compute_logits(hidden)
            self._score(logits, [claims[b] for b in active], [j] * len(active), reference, margins, active)

        results = []
        for b, claim in enumerate(claims):
            for j in _unreachable(claim, engine.eos_token_ids):
                margins[b][j] = math.inf
            exact = [r == t and math.isfinite(m) for r, t, m in zip(reference[b], claim.output_token_ids, margins[b])]
            results.append(ClaimResult(claim.claim_id, reference[b], exact,
                                       [0.0 if e else m for e, m in zip(exact, margins[b])]))  # fmt: skip
        return results

    def _forward(
        self, tokens: list[list[int]], starts: list[int], tables: list[list[int]], cache: PagedKVCache
    ) -> torch.Tensor:
        """Final hidden states of each sequence's new tokens (flattened), its keys written to `cache`."""
        device = self.engine.config.device
        batch = ForwardBatch(
            input_ids=torch.tensor([t for seq in tokens for t in seq], dtype=torch.long, device=device),
            positions=torch.tensor([s + i for seq, s in zip(tokens, starts) for i in range(len(seq))], device=device),
            start_positions=starts,
            query_lens=[len(seq) for seq in tokens],
            block_tables=[tables for _ in cache.groups],  # sliding layers mask by position themselves
            logits_indices=torch.empty(0, dtype=torch.long, device=device),
            kv_cache=cache,
        )
        return self.engine.runner.model(batch.input_ids, batch.positions, batch)

    def _score(
        self, logits: torch.Tensor, claims: list[Claim], positions: list[int], reference: list[list[int]],
        margins: list[list[float]], owners: list[int] | None = None,
    ) -> None:  # fmt: skip
        """Row i is claim i's output position `positions[i]`: append the reference's sample there and the
        claimed token's margin (see the module docstring) to its claim's lists (`owners[i]`, default i)."""
        rows = [self._row(c, j) for c, j in zip(claims, positions)]
        logits = self.sampler.process(logits, rows)
        claimed = torch.tensor([c.output_token_ids[j] for c, j in zip(claims, positions)], device=logits.device)
        chosen = argmax(logits)
        gaps = torch.zeros(len(rows), dtype=torch.float64)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy:
            index = torch.tensor(greedy, device=logits.device)
            gaps[index] = _greedy_margins(logits[index], chosen[index], claimed[index])
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            tokens, gaps[index] = _sampled_margins(logits[index], [rows[i] for i in sampled], claimed[index])
            chosen[index] = tokens
        for i, (token, gap) in enumerate(zip(chosen.tolist(), gaps.tolist())):
            owner = owners[i] if owners is not None else i
            reference[owner].append(token)
            margins[owner].append(gap)

    def _row(self, claim: Claim, j: int) -> SamplingRow:
        """What the sampler sees when it draws output token j."""
        return SamplingRow(
            request_id="claim", params=claim.params, eos_token_ids=self.engine.eos_token_ids,
            output_token_ids=claim.output_token_ids[:j], seed=claim.seed,
            position=len(claim.prompt_token_ids) + j, prompt_token_ids=claim.prompt_token_ids,
        )  # fmt: skip


def _greedy_margins(logits: torch.Tensor, chosen: torch.Tensor, claimed: torch.Tensor) -> torch.Tensor:
    """The log-probability gap (nats) from the argmax to the claimed token; inf where its logit is -inf."""
    logprobs = torch.log_softmax(logits, dim=-1)
    target = claimed.unsqueeze(-1)
    gap = (logprobs.gather(1, chosen.unsqueeze(-1)) - logprobs.gather(1, target)).double()
    return torch.where(logits.gather(1, target) == float("-inf"), math.inf, gap).squeeze(-1)


def _sampled_margins(
    logits: torch.Tensor, rows: list[SamplingRow], claimed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's own draw at each row, and the probability mass between its uniform and the claimed
    token's interval of the normalized cumulative distribution (inf where the claimed token has none)."""
    probs = filtered_probs(logits, rows)
    uniforms = row_uniforms(rows, logits.device)
    tokens, cdf = inverse_cdf(probs, uniforms)
    target = claimed.unsqueeze(-1)
    total = cdf[:, -1:].double()
    upper = cdf.gather(1, target).double() / total
    mass = probs.gather(1, target).double() / total
    u = uniforms.unsqueeze(-1)
    distance = torch.clamp(torch.maximum(upper - mass - u, u - upper), min=0.0)
    return tokens, torch.where(mass > 0, distance, math.inf).squeeze(-1)


def _finite_mean(margins: list[float]) -> float:
    finite = [m for m in margins if math.isfinite(m)]
    return sum(finite) / len(finite) if finite else 0.0


def _unreachable(claim: Claim, eos_token_ids: list[int]) -> list[int]:
    """Positions the generator could never have reached: after a stop token, or past max_tokens."""
    params = claim.params
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    output = claim.output_token_ids
    end = len(output)
    for j, token in enumerate(output):
        if token in stops and j >= params.min_tokens:
            end = j + 1
            break
    if params.max_tokens is not None:
        end = min(end, params.max_tokens)
    return list(range(end, len(output)))
