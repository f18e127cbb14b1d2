"""One tiny float32 checkpoint for every scaling test, and sampling settings whose samples end at different
lengths (a random model rarely samples EOS, so any of 40 token ids ends a sample)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ember import LLM, SamplingParams


@pytest.fixture(scope="package")
def llm(checkpoint_dir) -> LLM:
    return LLM(checkpoint_dir("llama"), dtype="float32", max_model_len=128)


@pytest.fixture(scope="package")
def params() -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=2, max_tokens=20, stop_token_ids=list(range(20, 60)))


@pytest.fixture(scope="package")
def prompt() -> str:
    return "The quick brown fox"


@pytest.fixture(scope="package")
def short(params: SamplingParams) -> SamplingParams:
    """For tests where the samples' lengths do not matter."""
    return replace(params, max_tokens=6)
