"""Errors as the client sees them: OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

Routes raise; one set of handlers turns ember's error types into responses, so no route has its own
try/except. A 4xx is something the client can fix, with `param` naming the field when one is to blame;
500 is reserved for ember's own bugs, and even then the connection stays usable (middleware.ErrorBoundary).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.engine.async_engine import EngineStepError, QueueFullError
from ember.errors import EmberError, InvalidRequestError

# Pydantic names union members in an error's location ("prompt", "list[str]", 0): these are not fields.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "literal"})
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]*")


class FieldError(InvalidRequestError):
    """A request field the client must change: answered 400 with `param` set to the field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotServedError(InvalidRequestError):
    """The request names a model this server doesn't serve (404)."""


class ApiError(Exception):
    """An HTTP-level failure with its own status (413, 415, 408, 401, ...)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def field_path(loc: tuple[Any, ...]) -> str | None:
    """A validation error's location as a field path, `messages[0].content`, without union member tags."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and _FIELD_NAME.fullmatch(part) and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path or None


def blamed_name(message: str, names: Collection[str]) -> str | None:
    """The parameter an ember error message blames, if it is one of `names`: the messages say which one to
    lower (`...; lower max_tokens`) or start with its name (`n must be ...`, `logit_bias: token id ...`)."""
    lowered = re.search(r"\blower (\w+)", message)
    for name in (lowered.group(1) if lowered else None, message.split(" ", 1)[0].rstrip(":")):
        if name in names:
            return name
    return None


def as_api_error(e: EmberError) -> ApiError:
    """The status, type and field of each of ember's error types."""
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(e, ModelNotServedError):
        return ApiError(404, str(e), "invalid_request_error", "model")
    if isinstance(e, EngineStepError):
        return ApiError(500, str(e), "server_error")
    return ApiError(400, str(e), "invalid_request_error", getattr(e, "param", None))


def install_error_handling(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(EmberError)
    async def ember_error(_: Request, e: EmberError) -> JSONResponse:
        return await api_error(_, as_api_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), type_, headers=e.headers)
