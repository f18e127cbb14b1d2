"""ember's bugs answer 500 in OpenAI's shape and leave the connection usable (no model: a tiny app with
ember's error handling, served by a real uvicorn, whose connection handling is what is under test)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from ember.server.errors import FieldError, field_path, install_error_handling
from ember.server.middleware import ErrorBoundary
from live_server import free_port


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handling(app)
    app.add_middleware(ErrorBoundary)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    @app.get("/stream-bug")
    async def stream_bug() -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            yield "data: 1\n\n"
            raise RuntimeError("a bug mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/field")
    async def field() -> None:
        raise FieldError("n: must be positive", "n")

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(), port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _address(response: httpx.Response) -> object:
    return response.extensions["network_stream"].get_extra_info("client_addr")


@pytest.mark.parametrize("path,status", [("/bug", 500), ("/field", 400), ("/stream-bug", 200)])
def test_error_keeps_the_connection(url: str, path: str, status: int) -> None:
    with httpx.Client(base_url=url, limits=httpx.Limits(max_connections=1)) as client:
        failed = client.get(path)
        assert failed.status_code == status
        if status != 200:
            error = failed.json()["error"]
            assert error["code"] == status and error["type"] and error["message"]
        after = client.get("/ok")
        assert after.json() == {"ok": True}
        assert _address(after) == _address(failed)


def test_field_error_names_the_field(url: str) -> None:
    assert httpx.get(url + "/field").json()["error"]["param"] == "n"


def test_field_path_drops_union_member_tags() -> None:
    assert field_path(("messages", 0, "content", "list[TextPart]", 1, "type")) == "messages[0].content[1].type"
    assert field_path(("prompt", "str")) == "prompt"
    assert field_path(()) is None
