"""`ember serve` on the default model as it runs by default (GGUF blocks kept quantized, bf16 activations, batch
invariant): 200 identical greedy requests and 200 identical seeded temperature-1 requests, all in flight at once,
each give one output, equal to the same request run alone offline, however the server's steps batched them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from ember import LLM, SamplingParams

from live_server import API_KEY, LiveServer

# Long enough (~70 tokens) that the first request computes its whole prompt in one chunk while the others find
# its full blocks in the prefix cache and compute only the tail: both must give the same logits.
PROMPT = (
    "A week of hiking in the mountains takes some planning. The weather changes quickly, water can be scarce "
    "on the high ridges, and the nearest shop is a day's walk away. Experienced hikers agree that the three "
    "most useful things to pack are"
)
COPIES = 200


@pytest.fixture(scope="module")
def default_server() -> Iterator[LiveServer]:
    live = LiveServer("--api-key", API_KEY, "--served-model-name", "gemma", "--max-model-len", "512",
                      "--max-waiting-requests", str(2 * COPIES))  # fmt: skip
    yield live
    live.stop()


@pytest.fixture(scope="module")
def default_offline() -> LLM:
    return LLM(max_model_len=512)


def _concurrent_texts(server: LiveServer, **params: object) -> list[str]:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=600) as client:

            async def one() -> str:
                completion = await client.completions.create(model="gemma", prompt=PROMPT, max_tokens=16, **params)
                return completion.choices[0].text

            return await asyncio.gather(*(one() for _ in range(COPIES)))

    return asyncio.run(run())


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 1.0, "seed": 1234}], ids=["greedy", "seeded"])
def test_identical_concurrent_requests_give_one_output(default_server, default_offline, params):
    texts = _concurrent_texts(default_server, **params)
    assert len(set(texts)) == 1, f"{len(set(texts))} different outputs among {COPIES} identical requests"
    alone = default_offline.generate([PROMPT], SamplingParams(max_tokens=16, **params), use_tqdm=False)
    assert texts[0] == alone[0].outputs[0].text
    default_server.wait_idle()
    assert default_server.metric("ember:kv_cache_blocks_used") == 0
