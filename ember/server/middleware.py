"""What wraps every request: the last-resort error boundary, the API key check and the X-Request-Id echo.
Plain ASGI (not BaseHTTPMiddleware), so streamed responses and client disconnects pass through untouched."""

from __future__ import annotations

import hmac
import logging
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.server.errors import error_response

logger = logging.getLogger("ember")

_MAX_REQUEST_ID = 256


class _HttpMiddleware:
    """HTTP requests go to `http`; anything else (lifespan events) passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class ApiKeyMiddleware(_HttpMiddleware):
    """Every route outside `public_paths` needs `Authorization: Bearer KEY` (the scheme's case does not
    matter, RFC 7235)."""

    def __init__(self, app: ASGIApp, api_key: str, public_paths: frozenset[str]) -> None:
        super().__init__(app)
        self.key = api_key.encode()
        self.public_paths = public_paths

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] not in self.public_paths and not self._authorized(scope):
            response = error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                      "authentication_error", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
        # constant time: no guessing the key by timing
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


class RequestIdMiddleware(_HttpMiddleware):
    """Every response carries `X-Request-Id`: the client's own (vLLM and OpenAI clients send one) or a new
    one, so a response, error or not, can be matched to its request."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = dict(scope["headers"]).get(b"x-request-id", b"")
        if not request_id or len(request_id) > _MAX_REQUEST_ID:
            request_id = uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class ErrorBoundary(_HttpMiddleware):
    """The last resort for exceptions no handler knows (ember's bugs): log, answer 500 in OpenAI's shape,
    and return normally. Starlette's own handler for `Exception` re-raises after answering, and uvicorn
    then closes the connection, so the client's next request on it would be reset."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = ended = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, ended
            started = started or message["type"] == "http.response.start"
            ended = ended or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            logger.exception("ember: request to %s failed", scope.get("path"))
            if not started:
                response = error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")
                await response(scope, receive, send)
            elif not ended:  # a body was under way: end it properly, so the connection can carry the next one
                await send({"type": "http.response.body", "body": b"", "more_body": False})
