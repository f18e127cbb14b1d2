"""/v1/embeddings against transformers: the mean of the final hidden states over the prompt, L2-normalized."""

from __future__ import annotations

import asyncio
import base64
import struct

import httpx
import openai
import pytest
import torch

from ember.server.embeddings import batches
from live_server import API_KEY, LiveServer

TEXTS = ["The quick brown fox", "def add(a, b):", "Hello, world"]


@pytest.fixture(scope="module")
def reference(model_dir: str):
    """transformers' last_hidden_state (after the final norm), mean-pooled and normalized, in float32."""
    import transformers

    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def embed(text: str) -> torch.Tensor:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.mean(0), dim=-1)

    return embed


def test_embeddings_equal_transformers_mean_pooling(server: LiveServer, reference) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    response = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    assert [d.index for d in response.data] == [0, 1, 2]
    for text, data in zip(TEXTS, response.data):
        got = torch.tensor(data.embedding)
        assert got.norm().item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(got, reference(text), atol=1e-4, rtol=1e-4)
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)


def test_base64_and_token_inputs_match_floats(server: LiveServer) -> None:
    def post(body: dict) -> dict:
        response = httpx.post(server.url + "/v1/embeddings", json=body, headers=server.headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    floats = post({"input": TEXTS[0]})
    assert floats["pooling"] == "mean"
    packed = base64.b64decode(post({"input": TEXTS[0], "encoding_format": "base64"})["data"][0]["embedding"])
    vector = floats["data"][0]["embedding"]
    assert struct.unpack(f"<{len(vector)}f", packed) == pytest.approx(vector, abs=1e-7)
    ids = httpx.post(server.url + "/tokenize", json={"prompt": TEXTS[0]}, headers=server.headers).json()["tokens"]
    assert post({"input": ids})["data"][0]["embedding"] == pytest.approx(vector, abs=1e-6)


def test_embeddings_do_not_disturb_generation(server: LiveServer) -> None:
    """Embedding forwards run on the step thread between steps: a stream running meanwhile is unchanged."""
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "ignore_eos": True}

    async def run(with_embeddings: bool) -> str:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
            generation = asyncio.create_task(client.post("/v1/completions", json=body))
            if with_embeddings:
                for _ in range(5):
                    response = await client.post("/v1/embeddings", json={"input": TEXTS * 4})
                    assert response.status_code == 200
            return (await generation).json()["choices"][0]["text"]

    assert asyncio.run(run(True)) == asyncio.run(run(False))


def test_batches_bound_the_tokens_of_a_forward() -> None:
    prompts = [[1] * 3, [1] * 4, [1] * 10, [1] * 2, [1] * 2]
    assert [[len(p) for p in group] for group in batches(prompts, 8)] == [[3, 4], [10], [2, 2]]
