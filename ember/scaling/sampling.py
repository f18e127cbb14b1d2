"""N samples of one prompt as ONE request (`SamplingParams(n=N)`): the siblings fork off the prompt once it is
computed and share its KV blocks. The engine is stepped here, not in `LLM.generate`, so an early stop can
abort the unfinished samples in the step where the m-th one finishes: their blocks are free before the
next step starts.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ember.engine.llm import LLM
from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams
from ember.scaling.accounting import ABORTED, Accounting, Meter
from ember.scaling.early_stop import EarlyStop

Prompt = str | Sequence[int]


@dataclass
class Samples:
    prompt: str
    """The prompt's text (decoded when it was given as token ids); scorers receive it."""
    prompt_token_ids: list[int]
    completions: list[CompletionOutput]
    """All N in index order; an aborted one has finish_reason "abort" and the tokens it had."""
    candidates: list[CompletionOutput]
    """The completions a strategy chooses among: all of them, or the first m to finish under an early stop."""
    accounting: Accounting


def as_engine(llm: LLM | LLMEngine) -> LLMEngine:
    return llm.engine if isinstance(llm, LLM) else llm


def sample(
    llm: LLM | LLMEngine, prompt: Prompt, n: int, params: SamplingParams | None = None,
    early_stop: EarlyStop | None = None,
) -> Samples:  # fmt: skip
    """Run `n` completions of `prompt` with `params` (its n must be 1 or `n`) to the end, or until `early_stop`
    says enough have finished. Log-probabilities of the sampled tokens are always kept (`logprobs=0` unless
    more were asked for): `cumulative_logprob` is only filled when logprobs are requested."""
    engine = as_engine(llm)
    params = _params(n, params or SamplingParams())
    if early_stop is not None:
        early_stop.check(n)
    if engine.has_unfinished_requests():
        # The loop below would take the other requests' outputs and drop them.
        raise InvalidRequestError("the engine has unfinished requests; run scaling strategies on an idle engine")
    request_id = f"scaling-{uuid.uuid4().hex}"
    meter = Meter(engine)
    engine.add_request(request_id, prompt, params)
    try:
        latest = _run(engine, request_id, meter, early_stop)
    except BaseException:  # a KeyboardInterrupt or an engine error leaves no blocks behind
        engine.abort_request(request_id)
        raise
    completions = [c if c.finished() else replace(c, finish_reason=ABORTED) for c in latest.outputs]
    finished = [c for c in completions if c.finish_reason != ABORTED]
    candidates = early_stop.keep(finished) if early_stop is not None else completions
    prompt_text = latest.prompt if latest.prompt is not None else _decode(engine, latest.prompt_token_ids)
    accounting = meter.finish(completions, len(latest.prompt_token_ids))
    return Samples(prompt_text, latest.prompt_token_ids, completions, candidates, accounting)


def check_positive(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequestError(f"{what} must be a positive integer, got {value!r}")


def _params(n: int, params: SamplingParams) -> SamplingParams:
    check_positive(n, "the number of samples N")
    if params.n not in (1, n):
        raise InvalidRequestError(f"SamplingParams.n is {params.n} but {n} samples were asked for; leave n at 1")
    return replace(params, n=n, logprobs=0 if params.logprobs is None else params.logprobs)


def _run(engine: LLMEngine, request_id: str, meter: Meter, early_stop: EarlyStop | None) -> RequestOutput:
    """Step until the request finishes, or abort it in the step the early stop is reached."""
    latest: RequestOutput | None = None
    while latest is None or not latest.finished:
        for output in engine.step():
            if output.request_id == request_id:
                latest = output
        meter.after_step()
        if latest is not None and not latest.finished and early_stop is not None and early_stop.reached(latest.outputs):
            engine.abort_request(request_id)  # frees every unfinished sibling's blocks now
            break
    assert latest is not None
    return latest


def _decode(engine: LLMEngine, token_ids: list[int]) -> str:
    # Special tokens kept: a chat-rendered prompt then reads (and re-encodes) as its template wrote it.
    return engine.tokenizer.decode(token_ids, skip_special_tokens=False)
