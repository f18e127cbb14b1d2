"""KL divergence KL(P_ref || Q_model) of the next-token distributions, position by position, over the
same scored tokens as perplexity (`ember.eval.windows`).

Two ways to get the reference:

* live: a second model (scorer) runs on the same windows; the KLD is exact over the full vocabulary.
* saved (`save_reference`): per scored position, the reference's top-K token ids and their normalized
  log-probs (logit - logsumexp, so the normalizer is folded in), plus the log-prob of the actual next
  token. A 262k vocabulary then costs K * 8 bytes per position instead of 1 MiB. The KLD is computed on
  the K+1 buckets {top-K tokens, everything else}: with r = 1 - sum_K p and t = 1 - sum_K q,

      KLD_K = sum_{i in top-K} p_i log(p_i / q_i) + r log(r / t)

  By the log-sum inequality (merging outcomes never increases a KL divergence) KLD_K <= KLD, and the gap
  is r times the divergence of the two distributions restricted to the tail, so it vanishes as r -> 0.
  The mean tail mass r is reported with the result so the tightness is visible. Top-1 agreement and the
  reference's perplexity are exact (the top-1 id and the target log-prob are stored).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ember.errors import InvalidRequestError
from ember.eval.perplexity import target_logprobs
from ember.eval.scoring import Scorer
from ember.eval.text import WindowPlan
from ember.eval.windows import Window

REFERENCE_FORMAT = "ember-kld-reference/1"


@dataclass
class KLDResult:
    mean_kld: float
    median_kld: float
    p99_kld: float
    max_kld: float
    top1_agreement: float
    ppl_model: float
    ppl_reference: float
    delta_ppl_pct: float  # 100 * (ppl_model / ppl_reference - 1)
    num_tokens: int
    ctx: int
    stride: int
    exact: bool  # full-vocabulary KLD (live reference) or the top-K bucket bound (saved reference)
    top_k: int | None
    mean_tail_mass: float | None  # reference probability outside its stored top-K
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _windows(plan: WindowPlan, scorer: Scorer, desc: str, progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits chunk, its target ids) over every scored row of the plan."""
    with tqdm(total=plan.num_targets, desc=desc, unit="tok", disable=not progress) as bar:
        for window in plan.windows:
            ids, rows, targets = plan.inputs(window)
            offset = 0
            for logits in scorer.logits(ids, rows):
                yield logits, torch.tensor(targets[offset : offset + logits.shape[0]], dtype=torch.long)
                offset += logits.shape[0]
                bar.update(logits.shape[0])


def _check_vocab(model: Scorer, vocab: int) -> None:
    if model.vocab_size != vocab:
        raise InvalidRequestError(f"vocabularies differ: model {model.vocab_size} vs reference {vocab} tokens")


def kld_live(model: Scorer, reference: Scorer, plan: WindowPlan, progress: bool = True) -> KLDResult:
    """Exact full-vocabulary KLD with both models run on the same windows."""
    _check_vocab(model, reference.vocab_size)
    started = time.perf_counter()
    klds, agree, nll_m, nll_r = [], 0, 0.0, 0.0
    with tqdm(total=plan.num_targets, desc="kld", unit="tok", disable=not progress) as bar:
        for window in plan.windows:
            ids, rows, targets = plan.inputs(window)
            offset = 0
            for q_logits, p_logits in zip(model.logits(ids, rows), reference.logits(ids, rows)):
                n = q_logits.shape[0]
                chunk = torch.tensor(targets[offset : offset + n], dtype=torch.long)
                log_q, log_p = torch.log_softmax(q_logits, -1), torch.log_softmax(p_logits, -1)
                # kl_div treats p = 0 entries as contributing 0 (no 0 * -inf NaNs).
                klds.append(F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).double())
                agree += _top1_agreements(q_logits, p_logits.argmax(-1))
                nll_m -= log_q.gather(-1, chunk[:, None]).double().sum().item()
                nll_r -= log_p.gather(-1, chunk[:, None]).double().sum().item()
                offset += n
                bar.update(n)
    return _result(torch.cat(klds), agree, nll_m, nll_r, plan, True, None, None, time.perf_counter() - started)


def save_reference(reference: Scorer, plan: WindowPlan, path: str, top_k: int = 64, progress: bool = True) -> float:
    """Write the reference's top-K log-probs per scored position (see the module doc); returns its ppl."""
    if top_k < 1:
        raise InvalidRequestError(f"top-k must be at least 1, got {top_k}")
    ids_list, lp_list, target_list = [], [], []
    for logits, targets in _windows(plan, reference, "reference", progress):
        log_p = torch.log_softmax(logits, -1)
        values, indices = log_p.topk(min(top_k, log_p.shape[-1]), dim=-1)
        ids_list.append(indices.to(torch.int32))
        lp_list.append(values)
        target_list.append(log_p.gather(-1, targets[:, None]).squeeze(-1))
    target_lp = torch.cat(target_list)
    torch.save(
        {
            "format": REFERENCE_FORMAT,
            "token_ids": torch.tensor(plan.token_ids, dtype=torch.int32),
            "bos_id": -1 if plan.bos_id is None else plan.bos_id,
            "ctx": plan.ctx,
            "stride": plan.stride,
            "windows": torch.tensor([[w.begin, w.end, w.first_target] for w in plan.windows], dtype=torch.int64),
            "vocab_size": reference.vocab_size,
            "topk_ids": torch.cat(ids_list),
            "topk_logprobs": torch.cat(lp_list),
            "target_logprobs": target_lp,
        },
        path,
    )
    return math.exp(-target_lp.double().mean().item())


def load_reference(path: str) -> tuple[WindowPlan, dict]:
    """The saved plan (token ids, BOS, windows) and the stored arrays."""
    try:
        data = torch.load(path, weights_only=True)
    except (OSError, RuntimeError) as e:
        raise InvalidRequestError(f"cannot read KLD reference {path!r}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != REFERENCE_FORMAT:
        raise InvalidRequestError(f"{path!r} is not an ember KLD reference (made with --save-reference)")
    windows = [Window(*map(int, row)) for row in data["windows"].tolist()]
    bos = int(data["bos_id"])
    plan = WindowPlan(data["token_ids"].tolist(), None if bos < 0 else bos, int(data["ctx"]), int(data["stride"]), windows)
    return plan, data


def limit_plan(plan: WindowPlan, max_tokens: int | None) -> WindowPlan:
    from ember.eval.windows import limit_windows

    return WindowPlan(plan.token_ids, plan.bos_id, plan.ctx, plan.stride, limit_windows(plan.windows, max_tokens))


def _top1_agreements(logits: torch.Tensor, reference_top1: torch.Tensor) -> int:
    """Positions where the reference's most likely token is also the model's. Ties count as agreement:
    bf16-rounded logits tie at the top often (4% of PTB positions for the default model), and argmax
    would otherwise pick one of the tied tokens arbitrarily."""
    chosen = logits.gather(-1, reference_top1[:, None]).squeeze(-1)
    return int((chosen >= logits.max(-1).values).sum())


def kld_saved(model: Scorer, path: str, max_tokens: int | None = None, progress: bool = True) -> KLDResult:
    """KLD against a saved reference: the top-K bucket bound of the module doc."""
    plan, data = load_reference(path)
    plan = limit_plan(plan, max_tokens)
    _check_vocab(model, int(data["vocab_size"]))
    started = time.perf_counter()
    ref_ids, ref_lp, ref_target = data["topk_ids"].long(), data["topk_logprobs"].float(), data["target_logprobs"]
    klds, tails, agree, nll_m, row = [], [], 0, 0.0, 0
    for logits, targets in _windows(plan, model, "kld", progress):
        n = logits.shape[0]
        ids, log_p = ref_ids[row : row + n], ref_lp[row : row + n].double()
        lse = torch.logsumexp(logits, -1, keepdim=True)
        log_q = (logits.gather(-1, ids) - lse).double()
        # log of the tail masses r and t; clamped so a (numerically) empty tail contributes 0.
        log_r = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(log_p, -1)), min=1e-30))
        log_t = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(log_q, -1)), min=1e-30))
        head = (log_p.exp() * (log_p - log_q)).sum(-1)
        klds.append(torch.clamp(head + log_r.exp() * (log_r - log_t), min=0.0))
        tails.append(log_r.exp())
        agree += _top1_agreements(logits, ids[:, 0])
        nll_m -= target_logprobs(logits, targets).double().sum().item()
        row += n
    nll_r = -ref_target[:row].double().sum().item()
    return _result(
        torch.cat(klds), agree, nll_m, nll_r, plan, False, ref_ids.shape[1], torch.cat(tails).mean().item(),
        time.perf_counter() - started,
    )


def _result(
    klds: torch.Tensor, agree: int, nll_m: float, nll_r: float, plan: WindowPlan, exact: bool,
    top_k: int | None, tail: float | None, seconds: float,
) -> KLDResult:
    n = klds.numel()
    ppl_m, ppl_r = math.exp(nll_m / n), math.exp(nll_r / n)
    return KLDResult(
        mean_kld=klds.mean().item(),
        median_kld=klds.median().item(),
        p99_kld=torch.quantile(klds, 0.99).item(),
        max_kld=klds.max().item(),
        top1_agreement=agree / n,
        ppl_model=ppl_m,
        ppl_reference=ppl_r,
        delta_ppl_pct=100.0 * (ppl_m / ppl_r - 1.0),
        num_tokens=n,
        ctx=plan.ctx,
        stride=plan.stride,
        exact=exact,
        top_k=top_k,
        mean_tail_mass=tail,
        seconds=seconds,
    )
