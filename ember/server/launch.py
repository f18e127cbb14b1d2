"""`ember serve`: load the engine, then run the HTTP server on uvicorn until interrupted."""

from __future__ import annotations

import functools
import logging
import os

import uvicorn

from ember.config import EngineConfig
from ember.engine.async_engine import AsyncLLM
from ember.server.app import ServerSettings, build_app
from ember.server.connection import DeadlineH11Protocol

logger = logging.getLogger("ember")

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"
_KEEP_ALIVE_SECONDS = 5  # an idle connection between requests is closed after this


def served_model_name(config: EngineConfig, name: str | None) -> str:
    """--served-model-name, else the --model argument as given (as vLLM does), else the default model's name."""
    if name:
        return name
    return config.model.rstrip(os.sep) if config.model else DEFAULT_MODEL_NAME


def serve(
    config: EngineConfig,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_waiting_requests: int | None = 256,
) -> None:
    llm = AsyncLLM(config, max_waiting_requests=max_waiting_requests)
    app = build_app(llm, settings)
    logger.warning(
        "ember serve: model %s as %r (%s); KV cache %d tokens; listening on http://%s:%d%s",
        config.model or "(default)", settings.model_name, llm.engine.dtype, llm.engine.kv_manager.capacity_tokens,
        host, port, " (API key required)" if settings.api_key else "",
    )
    protocol = functools.partial(DeadlineH11Protocol, header_timeout=settings.header_timeout)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                    timeout_keep_alive=_KEEP_ALIVE_SECONDS, http=protocol)  # type: ignore[arg-type]  # fmt: skip
    finally:
        llm.shutdown()
