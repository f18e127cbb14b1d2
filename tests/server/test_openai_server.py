"""`ember serve` driven by the official `openai` client (and raw HTTP for what the client won't send)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from ember import LLM, SamplingParams
from live_server import API_KEY, LiveServer

PROMPTS = ["The quick brown fox", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,", "Hello, world"]


def _greedy(llm: LLM, prompts: list[str], max_tokens: int) -> list[str]:
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and len(health.headers["x-request-id"]) == 32  # a new id when none is sent


def test_system_fingerprint_and_request_id(client):
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="x", max_tokens=2, extra_headers={"X-Request-Id": "mine-1"})
    assert raw.headers["x-request-id"] == "mine-1"
    first = raw.parse().system_fingerprint
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert first.startswith("fp_") and chat.system_fingerprint == first


def test_logit_bias_forces_a_token(client, offline):
    tokenizer = offline.get_tokenizer()
    free = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1, temperature=0).choices[0].text
    token = next(t for t in range(100, 200) if tokenizer.decode([t]) != free)  # a token greedy would not pick
    forced = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                       logit_bias={str(token): 100})  # fmt: skip
    assert forced.choices[0].text == tokenizer.decode([token] * 4)
    banned = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1, temperature=0,
                                       logit_bias={str(tokenizer.encode(free, add_special_tokens=False)[0]): -100})
    assert banned.choices[0].text != free


def test_max_tokens_0_with_echo_scores_the_prompt(client):
    """lm-eval's loglikelihood request: the prompt's log-probabilities, nothing generated."""
    scored = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1,
                                       temperature=0)  # fmt: skip
    one = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1, echo=True, logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.text == PROMPTS[0] and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == one.usage.prompt_tokens
    prompt_len = one.usage.prompt_tokens
    assert choice.logprobs.token_logprobs == one.choices[0].logprobs.token_logprobs[:prompt_len]
    assert choice.logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    streamed = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == PROMPTS[0]


def test_no_op_values_of_unsupported_fields_are_accepted(client):
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, response_format={"type": "text"},
        tools=[], tool_choice="none", n=1, extra_body={"best_of": 1, "suffix": ""})
    assert out.usage.completion_tokens == 2


def test_tokenizer_info(server, offline):
    info = httpx.get(server.url + "/tokenizer_info", headers=server.headers).json()
    tokenizer = offline.get_tokenizer()
    assert info["chat_template"] == tokenizer.chat_template and info["eos_token"] == "</s>"
    assert info["model_max_length"] == offline.engine.max_model_len


def test_completions_equal_offline_greedy(client, offline):
    expected = _greedy(offline, PROMPTS, 24)
    got = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=24, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected
    assert got.usage.completion_tokens == 24 * len(PROMPTS)
    assert got.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming(client, offline):
    expected = _greedy(offline, [PROMPTS[0]], 20)[0]
    chunks = list(client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming_and_not(client, offline):
    messages = [{"role": "user", "content": "Say something."}]
    tokenizer = offline.get_tokenizer()
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    expected = offline.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text
    full = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=16, temperature=0)
    assert full.choices[0].message.content == expected and full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens == len(prompt_ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_n2_seed_reproducible_and_logprobs(client):
    args = dict(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, n=2, seed=7, logprobs=3)
    first = client.completions.create(**args)
    again = client.completions.create(**args)
    assert len(first.choices) == 2
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    other = client.completions.create(**{**args, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    lp = first.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert all(v <= 0 for v in lp.token_logprobs)
    # keyed by token text, so tokens that decode alike (partial UTF-8) share an entry
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs):
        assert 1 <= len(top) <= 4 and max(top.values()) >= chosen - 1e-6
    assert "".join(lp.tokens) == first.choices[0].text


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)


def test_stop_string(client):
    free = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0).choices[0].text
    stop = free[8:11]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[: free.index(stop)]
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


def test_echo_and_token_prompt(client, offline):
    ids = offline.get_tokenizer().encode(PROMPTS[3])
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0).choices[0].text
    by_text = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=0, echo=True)
    assert by_text.choices[0].text == PROMPTS[3] + by_ids


def test_tokenize_detokenize(server, offline):
    tokenizer = offline.get_tokenizer()
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[0]}, headers=server.headers).json()
    assert tokens["tokens"] == tokenizer.encode(PROMPTS[0]) and tokens["count"] == len(tokens["tokens"])
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}, headers=server.headers).json()
    assert text["prompt"].endswith(PROMPTS[0])
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}, headers=server.headers).json()
    assert chat["tokens"] == tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def test_32_concurrent_streams(server, offline):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    expected = _greedy(offline, prompts, 16)
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(all_of_them()) == expected


def test_disconnects_free_every_block(server):
    server.wait_idle()
    assert server.metric("ember:kv_cache_blocks_used") == 0

    async def leave_early(client: httpx.AsyncClient, i: int) -> int:
        body = {"model": "tiny", "prompt": f"{PROMPTS[i % 5]} {i}", "max_tokens": 400, "temperature": 0,
                "ignore_eos": True, "stream": True}
        received = 0
        async with client.stream("POST", server.url + "/v1/completions", json=body,
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            async for line in response.aiter_lines():
                received += line.startswith("data:")
                if received == 3:
                    break  # closing the connection mid-stream
        return received

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(leave_early(client, i) for i in range(10)))

    assert asyncio.run(run()) == [3] * 10
    server.wait_idle()
    assert server.metric("ember:kv_cache_blocks_used") == 0
    assert server.metric("ember:generation_tokens_total") > 0


def test_unknown_fields_are_ignored(client):
    out = client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"frobnicate": True})
    assert out.usage.completion_tokens == 2


def test_overload_gets_429_and_admitted_finish(checkpoint_dir):
    live = LiveServer("--model", checkpoint_dir("llama"), "--max-num-seqs", "1", "--max-waiting-requests", "2")
    try:
        async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None, dict]:
            body = {"prompt": f"count {i}", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
            response = await client.post(live.url + "/v1/completions", json=body)
            return response.status_code, response.headers.get("retry-after"), response.json()

        async def run() -> list[tuple[int, str | None, dict]]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(one(client, i) for i in range(10)))

        results = asyncio.run(run())
        statuses = [r[0] for r in results]
        assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
        assert set(statuses) == {200, 429}
        for status, retry_after, body in results:
            if status == 429:
                assert retry_after is not None and body["error"]["type"] == "rate_limit_error"
            else:
                assert body["usage"]["completion_tokens"] == 200
    finally:
        live.stop()


def test_bench_serve_against_live_server(server, model_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "serve.json"
    run = subprocess.run(
        [sys.executable, "-m", "ember.cli", "bench", "serve", "--base-url", server.url, "--api-key", API_KEY,
         "--tokenizer", model_dir, "--dataset", "random", "--num-prompts", "12", "--input-len", "16",
         "--output-len", "8", "--request-rate", "20", "--max-concurrency", "4", "--save-result", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())["results"]
    assert results["completed"] == 12 and results["failed"] == 0
    assert results["total_output_tokens"] == 12 * 8
    for key in ("ttft", "tpot", "itl", "e2e"):
        assert results[key]["mean_ms"] > 0 and results[key]["median_ms"] <= results[key]["p99_ms"]
    assert results["ttft"]["mean_ms"] <= results["e2e"]["mean_ms"]
    assert "Output token throughput" in run.stdout


def test_bench_serve_reports_failures_without_crashing(server, model_dir, tmp_path):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "ember.cli", "bench", "serve", "--base-url", server.url, "--api-key", "wrong",
         "--model", "tiny", "--tokenizer", model_dir, "--dataset", "random", "--num-prompts", "3",
         "--input-len", "8", "--output-len", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Failed requests                              3" in run.stdout and "HTTP 401" in run.stdout


def test_non_streaming_disconnect_aborts(server):
    server.wait_idle()
    length_finished = server.metric('ember:request_success_total{finished_reason="length"', default=0)
    body = json.dumps({"model": "tiny", "prompt": "long one", "max_tokens": 480, "temperature": 0, "ignore_eos": True})
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + body.encode())
        deadline = time.monotonic() + 60
        while server.metric("ember:num_requests_running") == 0:  # hang up once it is being generated
            assert time.monotonic() < deadline
            time.sleep(0.01)
    server.wait_idle()
    assert server.metric("ember:kv_cache_blocks_used") == 0
    # it was aborted, not run to its end
    assert server.metric('ember:request_success_total{finished_reason="length"', default=0) == length_finished
