"""`ember bench serve`: load an OpenAI-compatible server (ember's or any other) and measure it, with
vLLM's serving-benchmark definitions:

- TTFT: from sending the request to the first streamed token;
- ITL: between successive streamed chunks of a request;
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with more than one output token;
- E2E: from sending the request to its last chunk.

Requests arrive as a Poisson process at `--request-rate` per second (`inf`: all at once), at most
`--max-concurrency` in flight. Prompts are random token ids or ShareGPT first turns (as in
`ember bench throughput`), sent as text; output lengths come from the dataset and are requested with
`max_tokens` and `ignore_eos` (servers that don't know `ignore_eos` may stop early: the output token
counts come from each server's own `usage`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ember.errors import EmberError, InvalidRequestError


@dataclass
class ServeRequest:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0  # the server's usage count (0: it sent none)
    generated_text: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)


@dataclass
class Summary:
    mean_ms: float
    median_ms: float
    p99_ms: float


@dataclass
class ServeResult:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Summary
    tpot: Summary
    itl: Summary
    e2e: Summary
    errors: list[str]


def summarize(values_s: list[float]) -> Summary:
    """Mean, median and p99 in milliseconds (ember.benchmark.stats), NaN for no values."""
    from ember.benchmark import stats

    if not values_s:
        return Summary(float("nan"), float("nan"), float("nan"))
    s = stats(values_s)
    return Summary(s.mean, s.p50, s.p99)


def load_tokenizer(path: str | None) -> Any:
    from ember.model_zoo import default_model_path
    from ember.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path or default_model_path())


def build_requests(args: argparse.Namespace, tokenizer: Any) -> list[ServeRequest]:
    from ember.benchmark import make_requests

    requests = make_requests(tokenizer, args.dataset, args.num_prompts, args.input_len, args.output_len, args.seed)
    # The server tokenizes the text again (adding its BOS): drop ours so the lengths stay as drawn.
    bos = tokenizer.bos_token_id
    return [
        ServeRequest(
            tokenizer.decode(r.prompt_token_ids[1:] if r.prompt_token_ids[:1] == [bos] else r.prompt_token_ids),
            len(r.prompt_token_ids),
            r.output_len,
        )
        for r in requests
    ]


async def send_one(session: Any, url: str, model: str, request: ServeRequest, extra: dict[str, Any]) -> RequestResult:
    """One streamed completion; timings per vLLM's definitions."""
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    result = RequestResult(prompt_len=request.prompt_len)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                now = time.perf_counter()
                choice = payload["choices"][0] if payload.get("choices") else {}
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if text:
                    result.generated_text += text
                    if chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    chunks += 1
                    last = now
                if payload.get("usage"):  # the server's own counts (its tokenization of the prompt text)
                    result.output_tokens = payload["usage"].get("completion_tokens", 0)
                    result.prompt_len = payload["usage"].get("prompt_tokens", result.prompt_len)
        result.e2e_s = last - start
        result.success = chunks > 0
        if not result.success:
            result.error = "no tokens streamed"
    except Exception as e:  # a load generator reports failures, it doesn't stop on them
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(
    url: str, model: str, requests: list[ServeRequest], request_rate: float, max_concurrency: int | None,
    extra: dict[str, Any], seed: int, headers: dict[str, str] | None = None, use_tqdm: bool = True,
) -> tuple[list[RequestResult], float]:
    import aiohttp
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc="Requests", unit="req", disable=not use_tqdm)
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers) as session:

        async def limited(request: ServeRequest) -> RequestResult:
            if limit is None:
                result = await send_one(session, url, model, request, extra)
            else:
                async with limit:
                    result = await send_one(session, url, model, request, extra)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(limited(request)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def summarize_run(results: list[RequestResult], duration: float, tokenizer: Any = None) -> ServeResult:
    """Without a usage count from the server, output tokens are counted by tokenizing the generated text
    (as vLLM's benchmark does), or else as streamed chunks."""
    ok = [r for r in results if r.success]
    for r in ok:
        if not r.output_tokens:
            r.output_tokens = (
                len(tokenizer.encode(r.generated_text, add_special_tokens=False)) if tokenizer is not None
                else len(r.itl_s) + 1
            )
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return ServeResult(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        ttft=summarize([r.ttft_s for r in ok]),
        tpot=summarize(tpots),
        itl=summarize([x for r in ok for x in r.itl_s]),
        e2e=summarize([r.e2e_s for r in ok]),
        errors=sorted({r.error for r in results if not r.success})[:10],
    )


def result_table(result: dict[str, Any]) -> str:
    """The `results` of a report (ServeResult as a dict) as a text table."""
    rows = [
        ("Successful requests", f"{result['completed']}"),
        ("Failed requests", f"{result['failed']}"),
        ("Benchmark duration (s)", f"{result['duration_s']:.2f}"),
        ("Total input tokens", f"{result['total_input_tokens']}"),
        ("Total output tokens", f"{result['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{result['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{result['output_throughput']:.1f}"),
        ("Total token throughput (tok/s)", f"{result['total_token_throughput']:.1f}"),
    ]
    lines = [f"{name:<34}{value:>12}" for name, value in rows]
    lines.append(f"{'':<20}{'mean ms':>12}{'median ms':>12}{'p99 ms':>12}")
    for label, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E latency", "e2e")):
        s = result[key]
        lines.append(f"{label:<20}{s['mean_ms']:>12.2f}{s['median_ms']:>12.2f}{s['p99_ms']:>12.2f}")
    lines += [f"error: {e}" for e in result["errors"]]
    return "\n".join(lines)


def add_serve_bench_parser(kinds: Any) -> None:
    serve = kinds.add_parser("serve", help="load an OpenAI-compatible server: TTFT, TPOT, ITL, E2E and throughput")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (default: %(default)s)")
    serve.add_argument("--endpoint", default="/v1/completions", help="completions route (default: %(default)s)")
    serve.add_argument("--model", default=None, help="model name to send (default: the server's first /v1/models entry)")
    serve.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    serve.add_argument("--tokenizer", default=None, help="GGUF or HF folder whose tokenizer builds the prompts "
                       "(default: Gemma 3 270M Q4_K_M)")
    serve.add_argument("--dataset", choices=("random", "sharegpt"), default="sharegpt", help="(default: sharegpt)")
    serve.add_argument("--num-prompts", type=int, default=100, help="(default: 100)")
    serve.add_argument("--input-len", type=int, default=None, help="random: prompt tokens (default: 128)")
    serve.add_argument("--output-len", type=int, default=None,
                       help="output tokens per request (default: random 128; sharegpt: the reply's length)")
    serve.add_argument("--request-rate", type=float, default=float("inf"),
                       help="requests per second, Poisson arrivals; inf sends all at once (default: inf)")
    serve.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    serve.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    serve.add_argument("--seed", type=int, default=0, help="(default: 0)")
    serve.add_argument("--save-result", default=None, help="write settings and results to this JSON file")
    serve.add_argument("--verbose", action="store_true", help="log details to stderr")


def bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    import urllib.request

    if args.request_rate <= 0:
        raise InvalidRequestError("--request-rate must be positive (or inf)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise InvalidRequestError("--max-concurrency must be at least 1")
    try:
        extra = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"--extra-body is not JSON: {e}") from e
    base = args.base_url.rstrip("/")
    model = args.model
    if model is None:
        request = urllib.request.Request(
            base + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                model = json.load(response)["data"][0]["id"]
        except Exception as e:
            raise EmberError(f"cannot reach {base}/v1/models to find the model name: {e}") from e
    tokenizer = load_tokenizer(args.tokenizer)
    requests = build_requests(args, tokenizer)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    results, duration = asyncio.run(
        run_load(base + args.endpoint, model, requests, args.request_rate, args.max_concurrency, extra, args.seed, headers)
    )
    result = summarize_run(results, duration, tokenizer)
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "bench_command", "verbose", "api_key")}
    settings["model"] = model
    settings["request_rate"] = str(args.request_rate)
    return {"benchmark": "serve", "settings": settings, "results": asdict(result)}

