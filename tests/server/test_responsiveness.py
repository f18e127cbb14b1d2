"""A heavy request (a chat template rendering megabytes, a prompt of megabytes) does not stall the others:
its rendering and tokenization run off the event loop, so /health and a tiny completion sent meanwhile
come back promptly."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from live_server import LiveServer

_MEGABYTE_TEMPLATE = "{% for i in range(3500) %}{{ 'lorem ipsum ' * 80 }}{% endfor %}"  # 3.4 MB of prompt text
HEAVY = {
    "template": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                          "chat_template": _MEGABYTE_TEMPLATE}),  # fmt: skip
    "prompt": ("/v1/completions", {"prompt": "hello world " * 300_000}),  # 3.6 MB
}


@pytest.mark.parametrize("kind", HEAVY)
def test_heavy_request_does_not_delay_others(server: LiveServer, kind: str) -> None:
    path, body = HEAVY[kind]
    heavy: dict[str, float] = {}

    def send_heavy() -> None:
        start = time.monotonic()
        response = httpx.post(server.url + path, json=body, headers=server.headers, timeout=300)
        heavy["status"], heavy["seconds"] = response.status_code, time.monotonic() - start

    thread = threading.Thread(target=send_heavy)
    thread.start()
    latencies = []
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as client:
        while thread.is_alive():
            for method, url, json in (("GET", "/health", None),
                                      ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})):  # fmt: skip
                start = time.monotonic()
                assert client.request(method, url, json=json).status_code == 200
                latencies.append(time.monotonic() - start)
            time.sleep(0.05)
    thread.join()
    assert heavy["status"] == 400  # both are far over the context limit, which only tokenizing can tell
    # A probe blocked behind the heavy request would wait about as long as it runs; on a machine so busy
    # that the heavy request takes many seconds, allow a quarter of its time.
    allowed = max(1.0, heavy["seconds"] / 4)
    assert max(latencies) < allowed, f"a probe took {max(latencies):.2f} s next to a {heavy['seconds']:.2f} s request"
