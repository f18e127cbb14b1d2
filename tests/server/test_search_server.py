"""Beam search (vLLM's `use_beam_search`) and OpenAI's `best_of` through `ember serve`, against the same
engine offline: the server returns what `LLM.beam_search` finds, and best_of's pick is the sample with the
highest mean log-probability per token."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from ember import LLM, BeamSearchParams, SamplingParams
from live_server import API_KEY

PROMPTS = ["The quick brown fox", "def add(a, b):"]
MESSAGES = [{"role": "user", "content": "Say something."}]


def _beams(llm: LLM, prompt: str | list[int], params: BeamSearchParams) -> list[str]:
    return [h.text for h in llm.beam_search([prompt], params, use_tqdm=False)[0].outputs]


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.5, True), (2.0, "never")])
def test_completion_beam_search_equals_offline(client, offline, length_penalty, early_stopping):
    params = BeamSearchParams(beam_width=3, max_tokens=10, length_penalty=length_penalty, early_stopping=early_stopping)
    got = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=10, n=3, extra_body={
        "use_beam_search": True, "length_penalty": length_penalty, "early_stopping": early_stopping})  # fmt: skip
    assert [c.index for c in got.choices] == list(range(6))
    for i, prompt in enumerate(PROMPTS):
        assert [c.text for c in got.choices[3 * i : 3 * i + 3]] == _beams(offline, prompt, params)
    assert {c.finish_reason for c in got.choices} <= {"stop", "length"}
    assert got.usage.completion_tokens > 0


def test_best_of_with_beam_search_returns_the_n_best_beams(client, offline):
    best = _beams(offline, PROMPTS[1], BeamSearchParams(beam_width=4, max_tokens=8))
    got = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, n=2, best_of=4,
                                    extra_body={"use_beam_search": True})  # fmt: skip
    assert [c.text for c in got.choices] == best[:2] and [c.index for c in got.choices] == [0, 1]


def test_beam_search_streamed_equals_not_streamed(client):
    args = dict(model="tiny", prompt=PROMPTS[0], max_tokens=8, n=2, extra_body={"use_beam_search": True})
    full = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == [c.text for c in full.choices]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_beam_search_equals_offline(client, offline):
    tokenizer = offline.get_tokenizer()
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    expected = _beams(offline, prompt_ids, BeamSearchParams(beam_width=2, max_tokens=8, length_penalty=0.0))
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=8, n=2,
                                         extra_body={"use_beam_search": True, "length_penalty": 0.0})  # fmt: skip
    assert [c.message.content for c in got.choices] == expected


def test_best_of_returns_the_sample_with_the_best_mean_logprob(client, offline):
    """best_of 4 samples with seeds 7..10 (as n = 4 with seed 7 does); the one returned has the highest mean
    log-probability; usage counts every sample (they were all generated); no logprobs unless asked."""
    samples = offline.generate([PROMPTS[0]], SamplingParams(n=4, seed=7, temperature=1.0, max_tokens=12, logprobs=0),
                               use_tqdm=False)[0].outputs  # fmt: skip
    ranked = sorted(samples, key=lambda c: -c.cumulative_logprob / len(c.token_ids))
    assert len({c.text for c in samples}) > 1, "the samples should differ for the test to mean anything"
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, seed=7, n=2,
                                    best_of=4)  # fmt: skip
    assert [c.text for c in got.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in got.choices] == [0, 1] and got.choices[0].logprobs is None
    assert got.usage.completion_tokens == sum(len(c.token_ids) for c in samples)
    with_logprobs = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1.0,
                                              seed=7, n=1, best_of=4, logprobs=2)  # fmt: skip
    choice = with_logprobs.choices[0]
    assert choice.text == ranked[0].text
    assert sum(choice.logprobs.token_logprobs) == pytest.approx(ranked[0].cumulative_logprob, abs=1e-4)


def test_abandoned_beam_search_frees_every_block(server):
    """A client that gives up on a long beam search: its beams are aborted and every KV block comes back.
    The client leaves once the server reports the search running, so nothing depends on how fast it runs."""
    server.wait_idle()
    body = json.dumps({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 400, "n": 4, "ignore_eos": True,
                       "use_beam_search": True}).encode()  # fmt: skip
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 60
        while server.metric("ember:num_requests_running") == 0:
            assert time.monotonic() < deadline, "the beam search never started"
            time.sleep(0.01)
    server.wait_idle()
    assert server.metric("ember:kv_cache_blocks_used") == 0


def test_served_outputs_verify_with_their_seeds(server, client, offline):
    """A seedless sampled completion reports the seed each choice drew: the offline engine reproduces the
    choice from it, and `POST /v1/verify` scores those tokens as the served model's own (exact match 1.0);
    claimed with another seed they are not."""
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, n=2)
    seeds = [c.model_extra["seed"] for c in got.choices]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]
    prompt_ids = offline.get_tokenizer().encode(PROMPTS[0])
    outputs = []
    for choice, seed in zip(got.choices, seeds):
        again = offline.generate([prompt_ids], SamplingParams(temperature=1.0, max_tokens=12, seed=seed),
                                 use_tqdm=False)[0].outputs[0]  # fmt: skip
        assert again.text == choice.text
        outputs.append(again.token_ids)

    def verify(seed_offset: int) -> httpx.Response:
        claims = [{"prompt_token_ids": prompt_ids, "output_token_ids": tokens, "seed": seed + seed_offset,
                   "sampling_params": {"temperature": 1.0, "max_tokens": 12}} for tokens, seed in zip(outputs, seeds)]
        return httpx.post(server.url + "/v1/verify", json={"claims": claims}, timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip

    honest = verify(0).json()
    assert honest["num_claims"] == 2 and honest["num_tokens"] == sum(map(len, outputs))
    assert honest["exact_match_rate"] == 1.0 and honest["mean_margin"] == 0.0
    assert [r["reference_token_ids"] for r in honest["claims"]] == outputs
    assert verify(1).json()["exact_match_rate"] < 1.0
    bad = httpx.post(server.url + "/v1/verify", json={"claims": [{"prompt_token_ids": [1]}]},
                     headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "claims[0]"
