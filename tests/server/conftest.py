"""One `ember serve` shared by the server tests (starting one takes seconds; most tests need only one)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
