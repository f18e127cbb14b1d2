"""`ember serve` processes shared by the server tests (starting one takes seconds): a tiny random checkpoint for
most, Qwen2.5-Coder 0.5B Instruct for structured output and tool calls."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from ember import LLM

from live_server import API_KEY, LiveServer


@pytest.fixture(scope="session")
def model_dir(checkpoint_dir) -> str:
    return checkpoint_dir("llama")


@pytest.fixture(scope="session")
def server(model_dir: str) -> Iterator[LiveServer]:
    """In float32, where ember's greedy outputs do not depend on which requests share a batch (bf16 outputs
    do), so tests may compare the server's outputs under any load with an offline run. Short connection
    deadlines, so the tests of slow clients are quick."""
    live = LiveServer("--model", model_dir, "--served-model-name", "tiny", "--api-key", API_KEY, "--dtype", "float32",
                      "--header-timeout", "2", "--body-timeout", "5")  # fmt: skip
    yield live
    live.stop()


@pytest.fixture(scope="session")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def offline(model_dir: str) -> LLM:
    """The server's engine offline, in the server's dtype (float32: outputs independent of the batch)."""
    return LLM(model_dir, kv_cache_memory=0.5, dtype="float32")


@pytest.fixture(scope="session")
def qwen_path() -> str:
    from ember.model_zoo import qwen25_coder_05b_path

    return qwen25_coder_05b_path()


@pytest.fixture(scope="session")
def qwen_server(qwen_path: str) -> Iterator[LiveServer]:
    """Qwen2.5-Coder 0.5B Instruct: a model that follows instructions and its template's tool format, for
    structured output and tool calling. Float32, so greedy outputs do not depend on the batch."""
    live = LiveServer("--model", qwen_path, "--served-model-name", "qwen", "--api-key", API_KEY, "--dtype", "float32",
                      "--max-model-len", "2048", "--kv-cache-memory", "0.25")  # fmt: skip
    yield live
    live.stop()


@pytest.fixture(scope="session")
def qwen_client(qwen_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=qwen_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
