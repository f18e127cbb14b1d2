"""The OpenAI-compatible request bodies (plus vLLM's extras), validated strictly.

Unknown fields are ignored, as OpenAI does; a field of the wrong type is an error (strict mode: "5" is
not an integer). Every integer must fit in 64 bits and every number must be finite, so nothing the
engine cannot represent gets past the door. A known OpenAI or vLLM field that ember does not implement
is declared here and rejected unless it has its no-op value: a client must never believe a setting
took effect when it did not. Ranges are checked once, by SamplingParams, so the server and the offline
API agree.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, model_validator,
)
from pydantic_core import core_schema

from ember.errors import InvalidRequestError
from ember.sampling_params import SamplingParams
from ember.server.errors import FieldError, blamed_name

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
# A prompt: text, a list of texts, token ids, or a list of token-id lists.
Prompt = str | list[str] | list[Int64] | list[list[Int64]]


def _prompt_list(prompt: Prompt, field: str) -> list[str | list[int]]:
    """A `Prompt` field as a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise FieldError(f"{field}: must not be empty", field)
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Unsupported:
    """Field metadata: reject the field unless it has one of its `no_op` values (which ask for nothing), and
    say so in the JSON schema, so clients and generated tests see what the server takes."""

    what: str
    no_op: tuple[Any, ...] = (None,)

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return {"enum": list(self.no_op), "description": f"{self.what}: not supported by ember"}

    def _check(self, value: Any) -> Any:
        if value not in self.no_op:
            accepted = ", ".join(map(json.dumps, self.no_op))
            raise ValueError(f"{self.what} is not supported by ember (accepted: {accepted})")
        return value


_NOTHING = (None, [])  # an optional list that asks for nothing
_NO = (False,)


def _token_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's `{"token id as a string": bias}` as token ids."""
    if bias is None:
        return None
    ids = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 19:
            raise ValueError(f"keys must be token ids written as strings (e.g. \"42\"), got {key!r}")
        ids[int(key)] = value
    return ids


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: Annotated[bool, _Unsupported("continuous_usage_stats", _NO)] = False


class _SamplingFields(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: Int64 = 1
    temperature: Finite | None = None
    top_p: Finite | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    logit_bias: Annotated[dict[str, Finite] | None, AfterValidator(_token_bias)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the provider's abuse monitoring: nothing to do here
    # vLLM's extras
    top_k: Int64 | None = None
    min_p: Finite | None = None
    repetition_penalty: Finite | None = None
    ignore_eos: bool = False
    min_tokens: Int64 = 0
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    add_special_tokens: bool | None = None  # None: true for completions, false for chat (templates write BOS)
    # Known fields ember does not implement (structured output and tools have their own issues).
    response_format: Annotated[dict[str, Any] | None, _Unsupported(
        "response_format other than text (structured output)", (None, {"type": "text"}))] = None
    prompt_logprobs: Annotated[Int64 | None, _Unsupported("prompt_logprobs (use echo with logprobs)")] = None
    use_beam_search: Annotated[bool, _Unsupported("beam search", _NO)] = False
    bad_words: Annotated[list[str] | None, _Unsupported("bad_words", _NOTHING)] = None
    allowed_token_ids: Annotated[list[Int64] | None, _Unsupported("allowed_token_ids")] = None
    guided_json: Annotated[Any, _Unsupported("guided decoding")] = None
    guided_regex: Annotated[str | None, _Unsupported("guided decoding")] = None
    guided_choice: Annotated[list[str] | None, _Unsupported("guided decoding")] = None
    guided_grammar: Annotated[str | None, _Unsupported("guided decoding")] = None
    structured_outputs: Annotated[dict[str, Any] | None, _Unsupported("structured output")] = None
    truncate_prompt_tokens: Annotated[Int64 | None, _Unsupported("truncate_prompt_tokens")] = None
    logits_processors: Annotated[list[Any] | None, _Unsupported("custom logits processors", _NOTHING)] = None
    priority: Annotated[Int64, _Unsupported("request priority", (0,))] = 0
    return_tokens_as_token_ids: Annotated[bool, _Unsupported("return_tokens_as_token_ids", _NO)] = False
    spaces_between_special_tokens: Annotated[bool, _Unsupported(
        "spaces_between_special_tokens false (decoding follows the tokenizer's own rules)", (True,))] = True

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options: only allowed when stream is true", "stream_options")
        return self

    def _sampling(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        values: dict[str, Any] = {
            "n": self.n,
            "stop": self.stop,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "stop_token_ids": self.stop_token_ids,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "logit_bias": self.logit_bias,
            "max_tokens": max_tokens,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
        }
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:  # null means the default, as in OpenAI's API
                values[name] = value
        try:
            return SamplingParams(**values)
        except InvalidRequestError as e:
            raise self.blame(e, values) from e

    def blame(self, e: InvalidRequestError, names: Collection[str]) -> FieldError:
        """`e` (a SamplingParams or engine check, which name parameters) as the error of this request's field."""
        name = blamed_name(str(e), names)
        if name is None:
            return FieldError(str(e), None)
        field = self.field_for(name)
        return FieldError(str(e) if field == name else f"{field}: {e}", field)

    def field_for(self, parameter: str) -> str:
        """The request's field behind a SamplingParams parameter."""
        return parameter

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: Int64 | None = 16
    logprobs: Int64 | None = None
    echo: bool = False
    best_of: Int64 | None = None
    suffix: Annotated[str | None, _Unsupported("suffix (insertion)", (None, ""))] = None

    @model_validator(mode="after")
    def _check_combinations(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of: only best_of equal to n is supported (no server-side selection)", "best_of")
        if self.max_tokens == 0 and self.min_tokens:
            raise FieldError("min_tokens: must be 0 when max_tokens is 0", "min_tokens")
        return self

    @property
    def scores_prompt_only(self) -> bool:
        """OpenAI's `max_tokens: 0`: generate nothing (with echo and logprobs: score the prompt)."""
        return self.max_tokens == 0

    def sampling_params(self) -> SamplingParams:
        # The engine generates at least one token; with max_tokens 0 the server drops it.
        max_tokens = 1 if self.scores_prompt_only else self.max_tokens
        prompt_logprobs = self.logprobs if self.echo else None
        return self._sampling(max_tokens, self.logprobs, prompt_logprobs)

    def prompts(self) -> list[str | list[int]]:
        return _prompt_list(self.prompt, "prompt")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[Any] | None, _Unsupported("tool_calls (tools)", _NOTHING)] = None
    tool_call_id: Annotated[str | None, _Unsupported("tool_call_id (tools)")] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _ChatTemplateFields(_Body):
    """How a conversation becomes a prompt (vLLM's extras)."""

    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: Annotated[bool, _Unsupported("continue_final_message", _NO)] = False
    documents: Annotated[list[Any] | None, _Unsupported("documents", _NOTHING)] = None


def _conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]


class ChatCompletionRequest(_SamplingFields, _ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: Int64 | None = None
    # Known fields ember does not implement.
    tools: Annotated[list[Any] | None, _Unsupported("tools (function calling)", _NOTHING)] = None
    tool_choice: Annotated[Any, _Unsupported("tool_choice (function calling)", (None, "none", "auto"))] = None
    functions: Annotated[list[Any] | None, _Unsupported("functions (function calling)", _NOTHING)] = None
    function_call: Annotated[Any, _Unsupported("function_call (function calling)", (None, "none", "auto"))] = None
    parallel_tool_calls: bool | None = None  # without tools there is nothing to call in parallel
    modalities: Annotated[list[str] | None, _Unsupported("output modalities other than text", (None, ["text"]))] = None
    audio: Annotated[dict[str, Any] | None, _Unsupported("audio output")] = None
    prediction: Annotated[dict[str, Any] | None, _Unsupported("predicted outputs")] = None
    store: Annotated[bool | None, _Unsupported("store (stored completions)", (None, False))] = None
    metadata: dict[str, str] | None = None  # labels for stored completions; with store off, nothing to do
    reasoning_effort: Annotated[str | None, _Unsupported("reasoning_effort")] = None
    web_search_options: Annotated[dict[str, Any] | None, _Unsupported("web search")] = None
    service_tier: Annotated[str | None, _Unsupported("service tiers other than auto or default",
                                                     (None, "auto", "default"))] = None  # fmt: skip
    echo: Annotated[bool, _Unsupported("echo in chat completions", _NO)] = False

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs: requires logprobs to be true", "top_logprobs")
        return self

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def field_for(self, parameter: str) -> str:
        if parameter == "logprobs":
            return "top_logprobs"
        if parameter == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return parameter

    def conversation(self) -> list[dict[str, str]]:
        return _conversation(self.messages)


class TokenizeRequest(_ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("give exactly one of `prompt` and `messages`", "prompt")
        return self

    def conversation(self) -> list[dict[str, str]]:
        return _conversation(self.messages or [])


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Int64]


class EmbeddingRequest(_Body):
    model: str | None = None
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    add_special_tokens: bool = True
    dimensions: Annotated[Int64 | None, _Unsupported("dimensions (shortened embeddings)")] = None
    truncate_prompt_tokens: Annotated[Int64 | None, _Unsupported("truncate_prompt_tokens")] = None

    def inputs(self) -> list[str | list[int]]:
        return _prompt_list(self.input, "input")
