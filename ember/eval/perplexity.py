"""Token-level perplexity: exp of the mean negative log-likelihood of every scored token (the model's own
tokens, e.g. BPE pieces, not words or bytes), under the window rule of `ember.eval.windows`."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ember.eval.scoring import Scorer
from ember.eval.text import WindowPlan


@dataclass
class PerplexityResult:
    engine: str
    ppl: float
    mean_nll: float  # nats per token
    num_tokens: int  # tokens scored
    text_tokens: int  # tokens in the whole text
    ctx: int
    stride: int
    bos: bool
    windows: int
    seconds: float
    unit: str = "token"

    def to_dict(self) -> dict:
        return asdict(self)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row without materializing a second [rows, vocab] tensor."""
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def perplexity(scorer: Scorer, plan: WindowPlan, progress: bool = True) -> PerplexityResult:
    started = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with tqdm(total=plan.num_targets, desc=f"perplexity ({scorer.name})", unit="tok", disable=not progress) as bar:
        for window in plan.windows:
            ids, rows, targets = plan.inputs(window)
            offset = 0
            for logits in scorer.logits(ids, rows):
                chunk = torch.tensor(targets[offset : offset + logits.shape[0]], dtype=torch.long)
                total -= target_logprobs(logits, chunk).double().sum()
                offset += logits.shape[0]
            count += offset
            bar.update(offset)
            bar.set_postfix(ppl=f"{math.exp(total.item() / max(count, 1)):.3f}")
    mean_nll = total.item() / count
    return PerplexityResult(
        engine=scorer.name,
        ppl=math.exp(mean_nll),
        mean_nll=mean_nll,
        num_tokens=count,
        text_tokens=len(plan.token_ids),
        ctx=plan.ctx,
        stride=plan.stride,
        bos=plan.bos_id is not None,
        windows=len(plan.windows),
        seconds=time.perf_counter() - started,
    )
