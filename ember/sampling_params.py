"""Sampling parameters, with vLLM's names and meanings, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ember.errors import InvalidRequestError
from ember.structured.params import StructuredOutputsParams

_MAX_N = 128
_MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions returned for the prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 or -1: all)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (-2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence of a token already generated (-2..2)."""
    repetition_penalty: float = 1.0
    """Divides positive / multiplies negative logits of tokens in the prompt or output (>1 discourages)."""
    seed: int | None = None
    """Seed of this request's random stream: the same seed gives the same output."""
    stop: list[str] | str | None = None
    """Strings that end the completion when generated (not included unless include_stop_str_in_output)."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the completion (included in token_ids)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    ignore_eos: bool = False
    """Keep generating after the end-of-sequence token."""
    max_tokens: int | None = 16
    """Most tokens generated; None: up to the context limit."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens are suppressed until this many tokens are generated."""
    logprobs: int | None = None
    """Number of top log-probabilities returned per generated token (plus the sampled token's)."""
    prompt_logprobs: int | None = None
    """Number of top log-probabilities returned per prompt token."""
    skip_special_tokens: bool = True
    """Leave special tokens (e.g. end-of-turn) out of the output text."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of the given token ids before sampling (OpenAI/vLLM semantics, -100..100)."""
    spaces_between_special_tokens: bool = True
    """Accepted for vLLM compatibility; decoding follows the tokenizer's own rules."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON Schema, JSON object, regex, choice or grammar (a dict is converted)."""
    _stop_strings: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_strings

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and 1 <= self.n <= _MAX_N, f"n must be an integer in [1, {_MAX_N}], got {self.n!r}")
        _check(_is_number(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
        )
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            f"max_tokens must be a positive integer, got {self.max_tokens!r}",
        )
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, int) and 0 <= value <= _MAX_LOGPROBS),
                f"{name} must be an integer in [0, {_MAX_LOGPROBS}], got {value!r}",
            )
        _check(all(isinstance(s, str) and s for s in self._stop_strings), "stop must be a non-empty string or list of them")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids (>= 0)")
        for token, bias in (self.logit_bias or {}).items():
            _check(isinstance(token, int) and not isinstance(token, bool) and token >= 0,
                   f"logit_bias keys must be token ids (>= 0), got {token!r}")
            _check(_is_number(bias) and -100 <= bias <= 100, f"logit_bias values must be in [-100, 100], got {bias!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


_MAX_BEAM_WIDTH = 64


@dataclass
class BeamSearchParams:
    """Beam search (vLLM's `BeamSearchParams` names; Hugging Face transformers' `generate(num_beams=...)`
    semantics): each step keeps the `beam_width` best continuations of all beams by summed log-probability; a
    finished hypothesis scores sum of logprobs / generated_length ** length_penalty (the prompt not counted)."""

    beam_width: int
    """Beams kept per step, and hypotheses returned (best first)."""
    max_tokens: int
    """Most tokens generated per hypothesis."""
    ignore_eos: bool = False
    """End-of-sequence tokens are ordinary tokens: every hypothesis runs to max_tokens."""
    temperature: float = 0.0
    """Scales the logits before the log-softmax (0 and 1: the model's own log-probabilities). Beam search is
    deterministic either way."""
    length_penalty: float = 1.0
    """Exponent of the generated length that divides a finished hypothesis's summed log-probability."""
    early_stopping: bool | str = False
    """True: stop once beam_width hypotheses are finished; False: also stop when no running beam can
    still beat the worst finished one by the current-length estimate; "never": that estimate uses
    max_tokens when length_penalty > 0 (transformers' three modes)."""

    def __post_init__(self) -> None:
        _check(
            isinstance(self.beam_width, int) and 1 <= self.beam_width <= _MAX_BEAM_WIDTH,
            f"beam_width must be an integer in [1, {_MAX_BEAM_WIDTH}], got {self.beam_width!r}",
        )
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            f"max_tokens must be a positive integer, got {self.max_tokens!r}",
        )
        _check(_is_number(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        _check(_is_number(self.length_penalty), f"length_penalty must be a number, got {self.length_penalty!r}")
        _check(
            self.early_stopping in (True, False, "never"),
            f'early_stopping must be true, false or "never", got {self.early_stopping!r}',
        )


@dataclass(frozen=True)
class StepBoundary:
    """Where a step of a step-wise search (particle filtering, step beam search, best-first search) ends for
    one sequence: after the text it generated in the step contains `delimiter`, or after `max_tokens` tokens
    in the step, whichever comes first (or when the sequence finishes)."""

    delimiter: str | None = "\n\n"
    """Text that ends a step (a blank line: a reasoning step); None: steps end by length only."""
    max_tokens: int | None = None
    """Most tokens in one step; None: steps end at the delimiter only."""

    def __post_init__(self) -> None:
        _check(self.delimiter is not None or self.max_tokens is not None, "a step needs a delimiter or max_tokens")
        _check(
            self.delimiter is None or (isinstance(self.delimiter, str) and self.delimiter != ""),
            f"delimiter must be a non-empty string or None, got {self.delimiter!r}",
        )
        _check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            f"max_tokens must be a positive integer or None, got {self.max_tokens!r}",
        )
