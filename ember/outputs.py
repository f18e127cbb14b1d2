"""What the engine returns to callers (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


# One entry per position: token id -> its log-probability (the chosen token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    delta_text: str = ""  # text added since the previous output of this step loop (for streaming)
    score: float | None = None  # beam search: cumulative_logprob / len(token_ids) ** length_penalty
    seed: int | None = None  # the sequence's sampling seed (given or drawn): with it the output can be verified

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepSearchState:
    """A step search's sequences (`LLMEngine.step_search_state`), by sequence id."""

    ready: bool
    """Every live sequence has ended its step (or there is none left): the caller decides what goes on."""
    parked: dict[str, CompletionOutput]
    """Live sequences whose step ended, with what they generated so far."""
    running: list[str]
    """Live sequences still in their step."""
    ended: dict[str, CompletionOutput]
    """Sequences that finished (a stop, EOS or the length limit), in the order they finished."""


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic) of a request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None  # admitted into the running batch
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
