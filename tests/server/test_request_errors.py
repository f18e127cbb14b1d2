"""Hostile and edge-case requests: each gets its 4xx in OpenAI's error shape, naming the field at fault, and
leaves its keep-alive connection usable: the next request on the same connection succeeds."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from live_server import API_KEY, LiveServer

MESSAGES = [{"role": "user", "content": "hi"}]
HUGE = 10**30  # far beyond 64 bits


@dataclass
class Case:
    name: str
    body: Any  # JSON-encoded unless bytes
    status: int = 400
    param: str | None = None  # the error's `param`; a trailing "*" matches any continuation
    path: str = "/v1/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    message: str = ""  # a part of the error message


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": MESSAGES, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "x", **fields}


CASES = [
    # integers beyond 64 bits, numbers that are not finite, values out of range
    Case("huge seed", completion(seed=HUGE), param="seed"),
    Case("huge max_tokens", completion(max_tokens=HUGE), param="max_tokens"),
    Case("huge n", completion(n=HUGE), param="n"),
    Case("huge top_k", completion(top_k=HUGE), param="top_k"),
    Case("huge logprobs", completion(logprobs=HUGE), param="logprobs"),
    Case("huge min_tokens", completion(min_tokens=HUGE), param="min_tokens"),
    Case("huge stop token id", completion(stop_token_ids=[HUGE]), param="stop_token_ids[0]"),
    Case("huge prompt token id", completion(prompt=[1, HUGE]), param="prompt*"),
    Case("huge top_logprobs", chat(logprobs=True, top_logprobs=HUGE), path="/v1/chat/completions",
         param="top_logprobs"),
    Case("huge max_completion_tokens", chat(max_completion_tokens=HUGE), path="/v1/chat/completions",
         param="max_completion_tokens"),
    Case("infinite temperature", b'{"prompt": "x", "temperature": 1e999}', param="temperature"),
    Case("NaN temperature", b'{"prompt": "x", "temperature": NaN}', param="temperature"),
    Case("infinite top_p", b'{"prompt": "x", "top_p": Infinity}', param="top_p"),
    Case("temperature < 0", completion(temperature=-0.5), param="temperature"),
    Case("top_p > 1", completion(top_p=1.5), param="top_p"),
    Case("n over the limit", completion(n=100000), param="n"),
    Case("negative max_tokens", completion(max_tokens=-1), param="max_tokens"),
    Case("max_tokens over context", completion(max_tokens=100000), param="max_tokens"),
    Case("prompt over context", completion(prompt="hello " * 2000), param="prompt"),
    Case("messages over context", chat(messages=[{"role": "user", "content": "hello " * 2000}]),
         path="/v1/chat/completions", param="messages"),
    Case("token id out of vocabulary", completion(prompt=[1, 10**9]), param="prompt"),
    Case("stop token id out of vocabulary", completion(stop_token_ids=[100000]), param="stop_token_ids"),
    Case("chat max_tokens 0", chat(max_tokens=0), path="/v1/chat/completions", param="max_tokens"),
    Case("min_tokens with max_tokens 0", completion(max_tokens=0, min_tokens=2), param="min_tokens"),
    # logit_bias
    Case("logit_bias above 100", completion(logit_bias={"5": 101}), param="logit_bias"),
    Case("logit_bias infinite", b'{"prompt": "x", "logit_bias": {"5": 1e999}}', param="logit_bias"),
    Case("logit_bias key not a token id", completion(logit_bias={"abc": 1}), param="logit_bias"),
    Case("logit_bias id out of vocabulary", completion(logit_bias={"100000": 1}), param="logit_bias"),
    # malformed bodies
    Case("bad json", b'{"prompt": "x", ', message="not valid JSON"),
    Case("body not an object", b'["x"]'),
    Case("text/plain body", b'{"prompt": "x"}', status=415, headers={"Content-Type": "text/plain"}),
    Case("form body", b"prompt=x", status=415, headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Case("wrong type", completion(max_tokens="5"), param="max_tokens"),
    Case("prompt wrong type", completion(prompt=5), param="prompt"),
    Case("empty prompt list", completion(prompt=[]), param="prompt"),
    Case("empty messages", chat(messages=[]), path="/v1/chat/completions", param="messages"),
    Case("message content wrong type", chat(messages=[{"role": "user", "content": 3}]), path="/v1/chat/completions",
         param="messages[0].content"),
    Case("image content", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
         path="/v1/chat/completions", param="messages[0].content[0].type"),
    Case("oversized body", b'{"prompt": "' + b"a" * (5 << 20) + b'"}', status=413),
    # chat templates: errors and limits
    Case("template TypeError", chat(chat_template="{{ 1 + 'a' }}"), path="/v1/chat/completions",
         param="chat_template", message="TypeError"),
    Case("template raise_exception", chat(chat_template="{{ raise_exception('roles must alternate') }}"),
         path="/v1/chat/completions", param="chat_template", message="roles must alternate"),
    Case("template undefined", chat(chat_template="{{ foo.bar }}"), path="/v1/chat/completions", param="chat_template"),
    Case("template syntax", chat(chat_template="{% for"), path="/v1/chat/completions", param="chat_template"),
    Case("template huge power", chat(chat_template="{{ 10 ** 10000000 }}"), path="/v1/chat/completions",
         param="chat_template", message="limits"),
    Case("template huge string", chat(chat_template="{{ 'a' * 100000000 }}"), path="/v1/chat/completions",
         param="chat_template", message="limits"),
    Case("template endless loop", chat(chat_template="{% for i in range(99999) %}{% for j in range(99999) %}"
                                                     "{% endfor %}{% endfor %}"),
         path="/v1/chat/completions", param="chat_template", message="longer than"),
    Case("tokenize template error", {"messages": MESSAGES, "chat_template": "{{ raise_exception('no') }}"},
         path="/tokenize", param="chat_template"),
    # structured output and tools
    Case("response_format unknown type", chat(response_format={"type": "xml"}), path="/v1/chat/completions",
         param="response_format", message="type must be one of"),
    Case("two constraints", completion(guided_json={"type": "object"}, guided_regex="a+"), param="guided_regex"),
    Case("schema the compiler refuses", completion(guided_json={"type": "nope"}), param="guided_json",
         message="nope"),
    Case("tool without a name", chat(tools=[{"type": "function", "function": {}}]), path="/v1/chat/completions",
         param="tools[0].function.name"),
    Case("tool_choice required without tools", chat(tool_choice="required"), path="/v1/chat/completions",
         param="tool_choice"),
    # fields ember does not implement
    Case("functions", chat(functions=[{"name": "f"}]), path="/v1/chat/completions", param="functions"),
    Case("suffix", completion(suffix="end"), param="suffix"),
    Case("best_of below n", completion(n=3, best_of=2), param="best_of", message="at least n"),
    Case("best_of above n streamed", completion(best_of=3, stream=True), param="best_of", message="streamed"),
    Case("best_of too large", completion(best_of=500), param="best_of"),
    Case("stream_options without stream", completion(stream_options={"include_usage": True}), param="stream_options"),
    Case("prompt_logprobs", completion(prompt_logprobs=2), param="prompt_logprobs"),
    # beam search takes no sampling settings, and its settings need it
    Case("beam search with top_p", completion(use_beam_search=True, top_p=0.5), param="top_p"),
    Case("beam search with logprobs", completion(use_beam_search=True, logprobs=1), param="logprobs"),
    Case("beam search with stop", completion(use_beam_search=True, stop=["x"]), param="stop"),
    Case("beam search with seed", chat(use_beam_search=True, seed=1), path="/v1/chat/completions", param="seed"),
    Case("beam search with a constraint", completion(use_beam_search=True, guided_regex="a+"), param="guided_regex"),
    Case("beam search with max_tokens 0", completion(use_beam_search=True, max_tokens=0), param="max_tokens"),
    Case("beam width too large", completion(use_beam_search=True, n=65), param="n", message="beam_width"),
    Case("length_penalty without beam search", completion(length_penalty=0.5), param="length_penalty"),
    Case("early_stopping without beam search", chat(early_stopping=True), path="/v1/chat/completions",
         param="early_stopping"),
    Case("early_stopping unknown", completion(use_beam_search=True, early_stopping="soon"), param="early_stopping"),
    Case("guided_whitespace_pattern", completion(guided_whitespace_pattern=" "), param="guided_whitespace_pattern"),
    Case("embedding dimensions", {"input": "x", "dimensions": 8}, path="/v1/embeddings", param="dimensions"),
    # routes, models, tokens, keys
    Case("unknown model", completion(model="gpt-9"), status=404, param="model"),
    Case("retrieve unknown model", None, status=404, param="model", path="/v1/models/gpt-9", method="GET"),
    Case("unknown route", completion(), status=404, path="/v1/nothing"),
    Case("tokenize prompt and messages", {"prompt": "x", "messages": MESSAGES}, path="/tokenize", param="prompt"),
    Case("detokenize out of vocabulary", {"tokens": [5, 100000]}, path="/detokenize", param="tokens"),
    Case("missing api key", completion(), status=401, headers={"Authorization": ""}),
    Case("wrong api key", completion(), status=401, headers={"Authorization": "Bearer nope"}),
    Case("api key guards tokenize", {"prompt": "x"}, status=401, path="/tokenize", headers={"Authorization": ""}),
    Case("api key guards detokenize", {"tokens": [5]}, status=401, path="/detokenize", headers={"Authorization": ""}),
    Case("api key guards metrics", None, status=401, path="/metrics", method="GET", headers={"Authorization": ""}),
]


@pytest.fixture(scope="module")
def connection(server: LiveServer) -> httpx.Client:
    """One keep-alive connection for the whole table (a pool of one)."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, limits=limits,
                      timeout=120) as client:  # fmt: skip
        yield client


def _local_address(response: httpx.Response) -> Any:
    return response.extensions["network_stream"].get_extra_info("client_addr")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_then_same_connection_works(connection: httpx.Client, case: Case) -> None:
    content = case.body if isinstance(case.body, (bytes, type(None))) else json.dumps(case.body).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": f"case-{case.name}", **case.headers}
    response = connection.request(case.method, case.path, content=content, headers=headers)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == case.status
    assert error["message"] and error["type"]
    assert case.message in error["message"]
    if case.param is not None and case.param.endswith("*"):
        assert (error["param"] or "").startswith(case.param[:-1]), error
    elif case.status == 400 or case.param is not None:
        assert error["param"] == case.param, error
    assert response.headers["x-request-id"] == f"case-{case.name}"

    after = connection.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert after.status_code == 200, after.text
    assert _local_address(after) == _local_address(response), "the error closed the connection"


def test_slow_head_is_cut_off(server: LiveServer) -> None:
    """Half a request line and then nothing: closed after the server's head deadline (2 s in these tests)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HT")
        start = time.monotonic()
        assert sock.recv(1024) == b""  # closed without an answer
    assert time.monotonic() - start < 20


def test_silent_connection_is_cut_off(server: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        assert sock.recv(1024) == b""


def test_slow_body_gets_408_and_close(server: LiveServer) -> None:
    """A body that stops arriving half-way: 408 after the body deadline (5 s here), and the connection closes."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head.encode() + b'{"prompt": "x"')
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in rest.lower()
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 408
