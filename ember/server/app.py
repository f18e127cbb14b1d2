"""The HTTP server: FastAPI routes of OpenAI's API (and vLLM's /tokenize, /detokenize, /tokenizer_info,
/metrics), described at /openapi.json.

Routes are thin: read and validate the body, call OpenAIServing, return its result. Errors are raised,
never caught here: errors.py turns each of ember's error types into OpenAI's error shape with its status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

import ember
from ember.engine.async_engine import AsyncLLM
from ember.metrics import ServingMetrics
from ember.server.body import read_json
from ember.server.chat_template import ChatTemplates, TemplateLimits
from ember.server.errors import ApiError, install_error_handling
from ember.server.middleware import ApiKeyMiddleware, ErrorBoundary, RequestIdMiddleware
from ember.server.openapi import install_openapi, json_body
from ember.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest, VerifyRequest,
)
from ember.server.responses import (
    ERRORS, ChatCompletionResponse, CompletionResponse, DetokenizeResponse, EmbeddingResponse, ModelCard, ModelList,
    TokenizeResponse, TokenizerInfo, VerifyResponse,
)
from ember.server.serving import OpenAIServing, Job

Model = TypeVar("Model", bound=BaseModel)
Generation = TypeVar("Generation", CompletionRequest, ChatCompletionRequest)

# One server-sent event (OpenAPI 3.0/3.1 put the per-event schema under `schema`): `data` is a JSON chunk, or
# the final "[DONE]".
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}  # fmt: skip
_STREAMED = {200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
                   "description": "the response, or with stream: server-sent events of chunks"}}  # fmt: skip
_PREPROCESS_THREADS = 2  # chat templates and tokenization: CPU-bound, so more threads would only contend


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` on every route but /health and /openapi.json."""
    metrics_public: bool = False
    """Serve /metrics without the API key (for a Prometheus scraper without credentials)."""
    max_body_bytes: int = 4 << 20
    """Largest request body; also the longest prompt a chat template may render."""
    header_timeout: float = 15.0
    """Seconds a connection may take to deliver a request's head (new or after a response)."""
    body_timeout: float = 30.0
    """Seconds a request's whole body may take to arrive."""
    template_timeout: float = 5.0
    """Seconds a chat template may take to render."""

    @property
    def public_paths(self) -> frozenset[str]:
        """The routes served without the API key."""
        return frozenset({"/health", "/openapi.json"} | ({"/metrics"} if self.metrics_public else set()))


def build_app(llm: AsyncLLM, settings: ServerSettings) -> FastAPI:
    preprocess = ThreadPoolExecutor(_PREPROCESS_THREADS, thread_name_prefix="ember-preprocess")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        preprocess.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ember", version=ember.__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = ServingMetrics(lambda: llm.stats, settings.model_name)
    templates = ChatTemplates(llm.tokenizer, TemplateLimits(settings.max_body_bytes, settings.template_timeout))
    serving = OpenAIServing(llm, settings.model_name, metrics, templates, preprocess)
    app.state.llm, app.state.metrics = llm, metrics

    install_error_handling(app)
    app.add_middleware(ErrorBoundary)  # innermost: below it, only ember's own handlers
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, public_paths=settings.public_paths)
    app.add_middleware(RequestIdMiddleware)  # outermost: 401s carry the id too
    install_openapi(app, [CompletionRequest, ChatCompletionRequest, EmbeddingRequest, TokenizeRequest,
                          DetokenizeRequest, VerifyRequest])  # fmt: skip

    async def parse(request: Request, model: type[Model]) -> Model:
        return await read_json(request, model, settings.max_body_bytes, settings.body_timeout)

    async def generate(
        request: Request, model: type[Generation], start: Callable[[Generation, float], Awaitable[Job]]
    ) -> Any:
        arrival = time.monotonic()
        body = await parse(request, model)
        job = await start(body, arrival)
        if body.stream:
            return StreamingResponse(serving.stream_response(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        return await _abort_on_disconnect(serving.full_response(job), request)

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**ERRORS, **_STREAMED},
              openapi_extra=json_body(CompletionRequest))  # fmt: skip
    async def completions(request: Request) -> Any:
        return await generate(request, CompletionRequest, serving.start_completion)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, **_STREAMED},
              openapi_extra=json_body(ChatCompletionRequest))  # fmt: skip
    async def chat_completions(request: Request) -> Any:
        return await generate(request, ChatCompletionRequest, serving.start_chat)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS,
              openapi_extra=json_body(EmbeddingRequest))  # fmt: skip
    async def embeddings(request: Request) -> Any:
        body = await parse(request, EmbeddingRequest)
        return await _abort_on_disconnect(serving.embed(body), request)

    @app.post("/v1/verify", response_model=VerifyResponse, responses=ERRORS, openapi_extra=json_body(VerifyRequest))
    async def verify(request: Request) -> Any:
        body = await parse(request, VerifyRequest)
        return await _abort_on_disconnect(serving.verify(body), request)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> Any:
        return {"object": "list", "data": [serving.model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def model(model_id: str) -> Any:
        serving.check_model(model_id)
        return serving.model_card()

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS, openapi_extra=json_body(TokenizeRequest))
    async def tokenize(request: Request) -> Any:
        return await serving.tokenize(await parse(request, TokenizeRequest))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS,
              openapi_extra=json_body(DetokenizeRequest))  # fmt: skip
    async def detokenize(request: Request) -> Any:
        return await serving.detokenize(await parse(request, DetokenizeRequest))

    @app.get("/tokenizer_info", response_model=TokenizerInfo, responses=ERRORS)
    async def tokenizer_info() -> Any:
        return serving.tokenizer_info()

    @app.get("/health", response_class=Response, responses={200: {"description": "the server is up"}})
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics", response_class=PlainTextResponse, responses=ERRORS)
    async def prometheus_metrics() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _abort_on_disconnect(work: Awaitable[Any], request: Request) -> Any:
    """Await `work`, cancelling it (which aborts its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ApiError(499, "client disconnected")
