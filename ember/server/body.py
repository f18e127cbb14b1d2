"""Reading a request body: JSON only, bounded in size and in time, validated into a request model.

The size is checked while reading (a lying or absent Content-Length cannot get more in) and the whole
body must arrive within a deadline, so a client that stops sending half-way holds nothing for long.
A validation error names the field at fault (`param`), as OpenAI's errors do.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ember.server.errors import ApiError, FieldError, field_path

Model = TypeVar("Model", bound=BaseModel)


async def read_json(request: Request, model: type[Model], max_bytes: int, timeout: float) -> Model:
    _check_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    try:
        body = await asyncio.wait_for(_read(request, max_bytes), timeout)
    except TimeoutError:
        # The rest of the body is still unread: this connection cannot carry another request.
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s",
                       headers={"Connection": "close"}) from None  # fmt: skip
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _field_error(e) from None


def _check_content_type(content_type: str | None) -> None:
    """JSON or no declared type (curl without -H); anything else would be parsed as what it is not."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"the request body must be JSON (Content-Type: application/json), not {media!r}")


async def _read(request: Request, max_bytes: int) -> bytes:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"request body exceeds {max_bytes} bytes")


def _field_error(e: ValidationError) -> FieldError:
    errors = e.errors()
    if errors[0]["type"] == "json_invalid":
        return FieldError(f"request body is not valid JSON: {errors[0]['msg']}", None)
    # A union reports one error per accepted form; the deepest is the form the client came closest to.
    first = max(errors, key=lambda err: len(err["loc"]))
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # raised by one of the models' own checks
        return cause
    param = field_path(first["loc"])
    if isinstance(cause, ValueError):
        message = str(cause)
    else:
        message = " or ".join(dict.fromkeys(err["msg"] for err in errors if field_path(err["loc"]) == param))
    return FieldError(f"{param}: {message}" if param else message, param)
