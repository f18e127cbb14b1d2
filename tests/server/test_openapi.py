"""/openapi.json describes every route with its real request and response schemas, and schemathesis,
generating requests from it, finds no 5xx and no response that breaks the document."""

from __future__ import annotations

import time

import httpx
import pytest

from live_server import LiveServer

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (the test extra has it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the skip: schemathesis brings hypothesis)
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

ROUTES = {
    ("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("post", "/v1/embeddings"), ("get", "/v1/models"),
    ("get", "/v1/models/{model_id}"), ("post", "/tokenize"), ("post", "/detokenize"), ("get", "/tokenizer_info"),
    ("get", "/health"), ("get", "/metrics"), ("post", "/v1/verify"),
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]  # fmt: skip
EXAMPLES_PER_ROUTE = 20  # 15 routes and modes: a few hundred requests in all


@pytest.fixture(scope="module")
def document(server: LiveServer) -> dict:
    return httpx.get(server.url + "/openapi.json").json()


def test_every_route_is_described(document: dict) -> None:
    described = {(method, path) for path, item in document["paths"].items() for method in item}
    assert described == ROUTES
    for method, path in ROUTES:
        operation = document["paths"][path][method]
        if method == "post":
            body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert body.rsplit("/", 1)[1] in document["components"]["schemas"]
        if path not in ("/health", "/metrics"):
            assert "$ref" in operation["responses"]["200"]["content"]["application/json"]["schema"]
            error = operation["responses"]["400"]["content"]["application/json"]["schema"]
            assert error["$ref"].endswith("ErrorResponse")


@pytest.fixture(scope="module")
def api_schema(server: LiveServer):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


# Negative cases (data the schema forbids) where there is data to break: the request bodies.
CASES = [(m, p, "positive") for m, p in sorted(ROUTES)] + [(m, p, "negative") for m, p in sorted(ROUTES) if m == "post"]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {g}" for m, p, g in CASES])
def test_generated_requests(api_schema, server: LiveServer, method: str, path: str, mode: str) -> None:
    operation = api_schema.find_operation_by_label(f"{method.upper()} {path}")

    @given(case=operation.as_strategy(GenerationMode(mode)))
    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def call(case) -> None:
        case.call_and_validate(headers=server.headers, checks=CHECKS, timeout=120)

    call()
