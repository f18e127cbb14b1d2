"""The API key check and the X-Request-Id echo, on a tiny ASGI app (no model needed)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from ember.cli import build_parser
from ember.server.app import ServerSettings
from ember.server.middleware import ApiKeyMiddleware, RequestIdMiddleware


def _app() -> FastAPI:
    app = FastAPI()
    for path in ("/health", "/metrics", "/tokenize", "/v1/models"):
        app.add_api_route(path, lambda: {"ok": True})
    app.add_middleware(ApiKeyMiddleware, api_key="s3cret", public_paths=frozenset({"/health"}))
    app.add_middleware(RequestIdMiddleware)
    return app


def _get(path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app()), base_url="http://test") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(run())


@pytest.mark.parametrize("authorization", ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer  s3cret "])
def test_bearer_scheme_is_case_insensitive(authorization: str) -> None:
    assert _get("/v1/models", {"Authorization": authorization}).status_code == 200


@pytest.mark.parametrize("authorization", [None, "", "s3cret", "Basic s3cret", "Bearer s3cre", "Bearer s3cret2"])
@pytest.mark.parametrize("path", ["/v1/models", "/tokenize", "/metrics"])
def test_every_route_but_the_public_ones_needs_the_key(path: str, authorization: str | None) -> None:
    response = _get(path, {} if authorization is None else {"Authorization": authorization})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"


def test_public_paths_need_no_key() -> None:
    assert _get("/health").status_code == 200


def test_request_id_is_echoed_or_made() -> None:
    assert _get("/health", {"X-Request-Id": "abc-1"}).headers["x-request-id"] == "abc-1"
    assert _get("/v1/models", {"X-Request-Id": "abc-2"}).headers["x-request-id"] == "abc-2"  # on a 401 too
    made = _get("/health").headers["x-request-id"]
    assert len(made) == 32 and made != _get("/health").headers["x-request-id"]


def test_metrics_public_opens_only_metrics() -> None:
    assert ServerSettings("m", "k").public_paths == {"/health", "/openapi.json"}
    assert ServerSettings("m", "k", metrics_public=True).public_paths == {"/health", "/openapi.json", "/metrics"}


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EMBER_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("EMBER_API_KEY")
    assert build_parser().parse_args(["serve"]).api_key is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    assert "EMBER_API_KEY" in capsys.readouterr().out
