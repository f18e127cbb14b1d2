"""What wraps every request: the API key check and the X-Request-Id echo. Plain ASGI (not
BaseHTTPMiddleware), so streamed responses and client disconnects pass through untouched."""

from __future__ import annotations

import hmac
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.server.errors import error_response

_MAX_REQUEST_ID = 256


class ApiKeyMiddleware:
    """Every route outside `public_paths` needs `Authorization: Bearer KEY` (the scheme's case does not
    matter, RFC 7235)."""

    def __init__(self, app: ASGIApp, api_key: str, public_paths: frozenset[str]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public_paths and not self._authorized(scope):
            response = error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                      "authentication_error", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
        # constant time: no guessing the key by timing
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


class RequestIdMiddleware:
    """Every response carries `X-Request-Id`: the client's own (vLLM and OpenAI clients send one) or a new
    one, so a response, error or not, can be matched to its request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = dict(scope["headers"]).get(b"x-request-id", b"")
        if not request_id or len(request_id) > _MAX_REQUEST_ID:
            request_id = uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
