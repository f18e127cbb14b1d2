"""The HTTP server: FastAPI routes of OpenAI's API (and vLLM's /tokenize, /detokenize, /metrics).

Every error leaves as OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx
status for anything the client can fix; a failure inside one request is that request's 500 and the
engine keeps serving the others.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.engine.async_engine import AsyncLLM, EngineStepError, QueueFullError
from ember.errors import EmberError, InvalidRequestError
from ember.metrics import ServingMetrics
from ember.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from ember.server.serving import ModelNotServedError, OpenAIServing

logger = logging.getLogger("ember")


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(llm: AsyncLLM, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="ember", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServingMetrics(lambda: llm.stats, settings.model_name)
    serving = OpenAIServing(llm, settings.model_name, metrics)
    app.state.llm, app.state.metrics = llm, metrics

    if settings.api_key is not None:
        app.add_middleware(_ApiKeyMiddleware, api_key=settings.api_key)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("ember: request failed")
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ApiError(413, f"request body exceeds {settings.max_body_bytes} bytes", "invalid_request_error")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > settings.max_body_bytes:
                raise ApiError(413, f"request body exceeds {settings.max_body_bytes} bytes", "invalid_request_error")
        try:
            json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_request_error") from e
        try:
            return model.model_validate_json(bytes(body))
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], "invalid_request_error", param) from e

    async def run(start: Callable[[], Awaitable[Any]], stream: bool, request: Request) -> Response:
        try:
            job = await start()
        except QueueFullError as e:
            return error_response(429, str(e), "rate_limit_error", headers={"Retry-After": "1"})
        except ModelNotServedError as e:
            return error_response(404, str(e), "invalid_request_error", "model")
        except EngineStepError as e:
            return error_response(500, str(e), "server_error")
        except EmberError as e:
            return error_response(400, str(e), "invalid_request_error")
        if stream:
            return StreamingResponse(serving.stream_response(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            body = await _abort_on_disconnect(serving.full_response(job), request)
        except EngineStepError as e:
            return error_response(500, str(e), "server_error")
        return JSONResponse(body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        body: CompletionRequest = await parse(request, CompletionRequest)
        return await run(lambda: serving.start_completion(body, arrival), body.stream, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        return await run(lambda: serving.start_chat(body, arrival), body.stream, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "ember",
            "max_model_len": llm.max_model_len,
        }]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body: TokenizeRequest = await parse(request, TokenizeRequest)
        try:
            serving.check_model(body.model)
            if (body.prompt is None) == (body.messages is None):
                raise InvalidRequestError("give exactly one of `prompt` and `messages`")
            if body.messages is not None:
                text = llm.tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.text()} for m in body.messages],
                    add_generation_prompt=body.add_generation_prompt, chat_template=body.chat_template,
                )
                tokens = llm.tokenizer.encode(text, add_special_tokens=False)
            else:
                tokens = llm.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        except ModelNotServedError as e:
            return error_response(404, str(e), "invalid_request_error", "model")
        except EmberError as e:
            return error_response(400, str(e), "invalid_request_error")
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": llm.max_model_len})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body: DetokenizeRequest = await parse(request, DetokenizeRequest)
        vocab = llm.engine.model_config.vocab_size
        try:
            serving.check_model(body.model)
        except ModelNotServedError as e:
            return error_response(404, str(e), "invalid_request_error", "model")
        if not all(0 <= t < vocab for t in body.tokens):
            return error_response(400, f"token ids must be in [0, {vocab})", "invalid_request_error", "tokens")
        return JSONResponse({"prompt": llm.tokenizer.decode(body.tokens, skip_special_tokens=False)})

    return app


class _ApiKeyMiddleware:
    """Every /v1 route needs `Authorization: Bearer KEY`. Plain ASGI (not BaseHTTPMiddleware), so streamed
    responses and client disconnects pass through untouched."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            supplied = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(supplied, self.expected):  # constant time: no key guessing by timing
                response = error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                          "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _abort_on_disconnect(work: Awaitable[Any], request: Request) -> Any:
    """Await `work`, cancelling it (which aborts its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ApiError(499, "client disconnected", "invalid_request_error")
