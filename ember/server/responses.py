"""The response bodies, as pydantic models: routes declare them, so /openapi.json describes what the
server really sends and FastAPI checks every non-streamed response against its model on the way out.

Streamed responses (server-sent events) carry the same choices as `*Chunk` objects, one per event.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(_Response):
    error: ErrorDetail


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None
    seed: int | None = None  # the choice's sampling seed (given or drawn), for `POST /v1/verify`; None: beam search


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(_Response):
    token: str
    logprob: float | None
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob]


class FunctionCall(_Response):
    name: str
    arguments: str  # JSON text


class ToolCall(_Response):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str | None  # None: only tool calls
    tool_calls: list[ToolCall] = []  # the request's tools the model called (always a list, as in vLLM)


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None
    seed: int | None = None  # as in CompletionChoice


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str


class TokenizerInfo(_Response):
    """vLLM's /tokenizer_info: what a client needs to use the server's tokenizer remotely."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int


class Embedding(_Response):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format "base64"


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    pooling: Literal["mean"]  # over the prompt's final hidden states, then L2-normalized


class ClaimReport(_Response):
    id: str | None
    num_tokens: int
    exact_match_rate: float
    mean_margin: float
    impossible_rate: float
    margins: list[float | Literal["inf"]]
    reference_token_ids: list[int]


class VerifyResponse(_Response):
    """Token-DiFR scores of the claims against the served model (docs/verification.md)."""

    num_claims: int
    num_tokens: int
    exact_match_rate: float
    mean_margin: float
    impossible_rate: float
    seconds: float
    tokens_per_second: float
    claims: list[ClaimReport]


# For the OpenAPI description of the statuses a route can answer with.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "invalid request (the error's `param` names the field)"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (408, "the request body did not arrive in time"),
        (413, "request body too large"),
        (415, "request body is not JSON"),
        (429, "too many requests waiting; retry after Retry-After seconds"),
        (500, "internal error (a bug in ember)"),
    )
}
