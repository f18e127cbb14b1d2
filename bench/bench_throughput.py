#!/usr/bin/env python
"""Offline batch throughput of ember against llama.cpp and transformers on the default model.

One workload (default: 64 requests of 128 random prompt tokens, 128 output tokens each; or ShareGPT
conversations with `--dataset sharegpt`) is built once from ember's tokenizer and handed, as the same token
ids and output lengths, to each engine in its own subprocess, one after the other (so they never share the
2 cores). Every request is greedy and produces exactly its output length (EOS ignored).

- ember-bf16: `LLM(dtype="bfloat16")`, all requests at once to `LLM.generate` (continuous batching inside).
- llama.cpp: llama-cpp-python's low-level batch API (`llama_batch_init` / `llama_decode`), 2 threads,
  flash attention, continuous batching over `n_seq_max` parallel sequences with a greedy argmax over
  `llama_get_logits_ith`; each setting of `--llama-parallel` is timed and the best one reported.
- hf-bf16: transformers `generate` (bf16 weights dequantized from the same GGUF), left padding, batches of
  each size in `--hf-batch-sizes`, the best one reported. With ShareGPT's unequal output lengths a batch
  runs to its longest request; only the requested tokens are counted (as vLLM's benchmark does).

Each engine gets one short untimed warm-up first. Reported per engine: elapsed s, output tok/s, total
(prompt + output) tok/s, requests/s and the ratio of output tok/s to llama.cpp's.

    python bench/bench_throughput.py                                    # all engines, default workload
    python bench/bench_throughput.py --engines ember-bf16,llama.cpp --out results.json
    python bench/bench_throughput.py --dataset sharegpt --num-prompts 32
    python bench/bench_throughput.py --num-prompts 4 --input-len 16 --output-len 8   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench_single_stream import child_env, machine_info, print_machine

ENGINES = ("ember-bf16", "llama.cpp", "hf-bf16")
BASELINE = "llama.cpp"
RESULT_PREFIX = "BENCH_RESULT "
AGREEMENT_TOKENS = 8  # leading greedy tokens of each request kept to compare engines
LLAMA_N_BATCH = 2048  # tokens per llama_decode call (ember's max_num_batched_tokens default)
LLAMA_N_UBATCH = 512


@dataclass
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class Trial:
    setting: str
    elapsed_s: float


@dataclass
class Result:
    engine: str
    setting: str  # the configuration the numbers are for (the fastest of `trials`)
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    output_tok_s: float
    total_tok_s: float
    req_s: float
    load_s: float = 0.0
    load_avg_1min_after: float = 0.0
    trials: list[Trial] = field(default_factory=list)
    first_tokens: list[list[int]] = field(default_factory=list)


def check_outputs(requests: Sequence[Request], outputs: Sequence[Sequence[int]]) -> None:
    for i, (request, tokens) in enumerate(zip(requests, outputs)):
        if len(tokens) != request.output_len:
            raise RuntimeError(f"request {i} asked for {request.output_len} tokens, got {len(tokens)}")


def best_result(engine: str, requests: Sequence[Request], runs: Sequence[tuple[str, float, list[list[int]]]]) -> Result:
    """The fastest of `runs` (setting, elapsed s, outputs), with every run kept as a trial."""
    setting, elapsed, outputs = min(runs, key=lambda run: run[1])
    prompt_tokens = sum(len(r.prompt) for r in requests)
    output_tokens = sum(r.output_len for r in requests)
    return Result(
        engine=engine,
        setting=setting,
        elapsed_s=elapsed,
        num_requests=len(requests),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        output_tok_s=output_tokens / elapsed,
        total_tok_s=(prompt_tokens + output_tokens) / elapsed,
        req_s=len(requests) / elapsed,
        trials=[Trial(s, e) for s, e, _ in runs],
        first_tokens=[list(o[:AGREEMENT_TOKENS]) for o in outputs],
    )


# ---------------------------------------------------------------------------------------------------
# Engines (each constructed only inside its child process)
# ---------------------------------------------------------------------------------------------------


def warmup_requests(requests: Sequence[Request]) -> list[Request]:
    """Two short requests (distinct from the workload's prompts), to pay first-call costs untimed."""
    return [Request(r.prompt[:8][::-1], 4) for r in requests[:2]]


def run_ember(requests: Sequence[Request], model_path: str, kv_cache_dtype: str = "auto") -> Result:
    from ember import LLM, SamplingParams  # before torch: ember sets OMP_WAIT_POLICY at import

    start = time.perf_counter()
    llm = LLM(model_path, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype)
    load_s = time.perf_counter() - start

    def generate(batch: Sequence[Request], use_tqdm: bool) -> tuple[float, list[list[int]]]:
        params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in batch]
        start = time.perf_counter()
        outputs = llm.generate([r.prompt for r in batch], params, use_tqdm=use_tqdm)
        return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outputs]

    generate(warmup_requests(requests), use_tqdm=False)
    elapsed, outputs = generate(requests, use_tqdm=True)
    check_outputs(requests, outputs)
    config = llm.engine.config
    setting = f"max_num_seqs {config.max_num_seqs}, max_num_batched_tokens {config.max_num_batched_tokens}"
    setting += f", KV {kv_cache_dtype}" if kv_cache_dtype != "auto" else ""
    result = best_result("ember-bf16", requests, [(setting, elapsed, outputs)])
    result.load_s = load_s
    return result


@dataclass
class Slot:
    index: int  # of the request this llama.cpp sequence serves
    fed: int = 0  # prompt tokens already decoded


def fill_batch(
    batch: Any, active: dict[int, Slot], requests: Sequence[Request], outputs: list[list[int]]
) -> list[tuple[int, int]]:
    """One llama_batch: the last sampled token of every decoding sequence, then prompt chunks of new ones
    in the room left. Returns (batch index, sequence id) of the tokens whose logits are wanted."""
    n = 0
    sampled_at = []

    def add(token: int, pos: int, seq: int, logits: bool) -> None:
        nonlocal n
        batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, logits
        batch.seq_id[n][0] = seq
        if logits:
            sampled_at.append((n, seq))
        n += 1

    for seq, slot in active.items():
        prompt, output = requests[slot.index].prompt, outputs[slot.index]
        if slot.fed == len(prompt):
            add(output[-1], len(prompt) + len(output) - 1, seq, True)
    for seq, slot in active.items():
        prompt = requests[slot.index].prompt
        take = min(len(prompt) - slot.fed, LLAMA_N_BATCH - n)
        for pos in range(slot.fed, slot.fed + take):
            add(prompt[pos], pos, seq, pos == len(prompt) - 1)
        slot.fed += take
    batch.n_tokens = n
    return sampled_at


class LlamaCppBatched:
    """llama.cpp with `parallel` sequences decoded together (continuous batching, like llama-server):
    each llama_decode carries one token of every decoding sequence plus prompt chunks of new ones."""

    def __init__(self, model_path: str, kv_unified: bool = False) -> None:
        import llama_cpp
        import numpy as np

        self.lib, self.np, self.kv_unified = llama_cpp, np, kv_unified
        self._quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept alive: C holds it
        llama_cpp.llama_log_set(self._quiet, None)
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def new_context(self, parallel: int, seq_len: int) -> Any:
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_seq_max = parallel
        params.n_ctx = parallel * seq_len  # without kv_unified, split evenly: seq_len for each sequence
        params.n_batch = LLAMA_N_BATCH
        params.n_ubatch = LLAMA_N_UBATCH
        params.n_threads = params.n_threads_batch = 2
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        # Off (llama.cpp's advice for sequences that share no prefix): each sequence attends only to its
        # own KV stream, not to the masked cells of all of them.
        params.kv_unified = self.kv_unified
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {parallel} sequences")
        if lib.llama_n_ctx_seq(ctx) < seq_len:
            raise RuntimeError(f"llama.cpp gives each sequence {lib.llama_n_ctx_seq(ctx)} tokens, need {seq_len}")
        return ctx

    def generate(self, ctx: Any, requests: Sequence[Request], parallel: int) -> list[list[int]]:
        lib, np = self.lib, self.np
        memory = lib.llama_get_memory(ctx)
        lib.llama_memory_clear(memory, True)
        batch = lib.llama_batch_init(LLAMA_N_BATCH, 0, 1)
        outputs: list[list[int]] = [[] for _ in requests]
        waiting = deque(range(len(requests)))
        free = list(range(parallel - 1, -1, -1))
        active: dict[int, Slot] = {}  # by sequence id
        try:
            while waiting or active:
                while free and waiting:
                    active[free.pop()] = Slot(waiting.popleft())
                sampled_at = fill_batch(batch, active, requests, outputs)
                code = lib.llama_decode(ctx, batch)
                if code != 0:
                    raise RuntimeError(f"llama_decode returned {code}")
                for i, seq in sampled_at:
                    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,))
                    index = active[seq].index
                    outputs[index].append(int(logits.argmax()))  # EOS is never checked: exactly output_len
                    if len(outputs[index]) == requests[index].output_len:
                        lib.llama_memory_seq_rm(memory, seq, -1, -1)  # the whole sequence: never fails
                        del active[seq]
                        free.append(seq)
        finally:
            lib.llama_batch_free(batch)
        return outputs

    def timed(self, requests: Sequence[Request], parallel: int) -> tuple[float, list[list[int]]]:
        seq_len = max(len(r.prompt) + r.output_len for r in requests)
        seq_len = -(-seq_len // 256) * 256
        ctx = self.new_context(parallel, seq_len)
        try:
            self.generate(ctx, warmup_requests(requests), parallel)
            start = time.perf_counter()
            outputs = self.generate(ctx, requests, parallel)
            return time.perf_counter() - start, outputs
        finally:
            self.lib.llama_free(ctx)


def run_llama_cpp(requests: Sequence[Request], model_path: str, parallels: Sequence[int], kv_unified: bool) -> Result:
    start = time.perf_counter()
    runner = LlamaCppBatched(model_path, kv_unified)
    load_s = time.perf_counter() - start
    runs = []
    for parallel in parallels:
        elapsed, outputs = runner.timed(requests, parallel)
        check_outputs(requests, outputs)
        runs.append((f"{parallel} parallel sequences" + (", unified KV" if kv_unified else ""), elapsed, outputs))
        print(f"llama.cpp, {parallel} parallel: {elapsed:.2f} s", file=sys.stderr, flush=True)
    result = best_result("llama.cpp", requests, runs)
    result.load_s = load_s
    return result


class HFBatched:
    def __init__(self, model_path: str, pad_token_id: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(2)
        self.torch, self.pad = torch, pad_token_id
        folder, name = os.path.split(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16).eval()

    def generate_batch(self, batch: Sequence[Request]) -> list[list[int]]:
        """One left-padded `generate` call; every row runs to the batch's longest output length."""
        torch = self.torch
        width = max(len(r.prompt) for r in batch)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt)) + r.prompt for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
        n = max(r.output_len for r in batch)
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                top_p=None, top_k=None, pad_token_id=self.pad,
            )
        return [row[width : width + r.output_len] for r, row in zip(batch, out.tolist())]

    def timed(self, requests: Sequence[Request], batch_size: int) -> tuple[float, list[list[int]]]:
        self.generate_batch(warmup_requests(requests))
        start = time.perf_counter()
        outputs = []
        for first in range(0, len(requests), batch_size):
            outputs += self.generate_batch(requests[first : first + batch_size])
        return time.perf_counter() - start, outputs


def run_hf(requests: Sequence[Request], model_path: str, pad_token_id: int, batch_sizes: Sequence[int]) -> Result:
    start = time.perf_counter()
    runner = HFBatched(model_path, pad_token_id)
    load_s = time.perf_counter() - start
    runs = []
    for size in batch_sizes:
        elapsed, outputs = runner.timed(requests, size)
        check_outputs(requests, outputs)
        runs.append((f"batches of {size}", elapsed, outputs))
        print(f"transformers, batch {size}: {elapsed:.2f} s", file=sys.stderr, flush=True)
    result = best_result("hf-bf16", requests, runs)
    result.load_s = load_s
    return result


def child_main(engine: str, args: argparse.Namespace) -> None:
    with open(args.spec_file) as f:
        spec = json.load(f)
    requests = [Request(r["prompt"], r["output_len"]) for r in spec["requests"]]
    model = spec["model"]
    if engine == "ember-bf16":
        result = run_ember(requests, model, args.kv_cache_dtype)
    elif engine == "llama.cpp":
        result = run_llama_cpp(requests, model, sizes(args.llama_parallel, len(requests)), args.llama_kv_unified)
    elif engine == "hf-bf16":
        result = run_hf(requests, model, spec["pad_token_id"], sizes(args.hf_batch_sizes, len(requests)))
    else:
        raise ValueError(f"unknown engine {engine!r}")
    result.load_avg_1min_after = round(os.getloadavg()[0], 2)
    print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)


def sizes(text: str, num_requests: int) -> list[int]:
    """"16,all" -> [16, num_requests]; each capped at num_requests, duplicates dropped."""
    values = [num_requests if v.strip() == "all" else int(v) for v in text.split(",") if v.strip()]
    return list(dict.fromkeys(max(1, min(v, num_requests)) for v in values))


# ---------------------------------------------------------------------------------------------------
# Parent: workload, subprocesses, table
# ---------------------------------------------------------------------------------------------------


def write_workload(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from ember.benchmark import make_requests
    from ember.model_zoo import default_model_path
    from ember.tokenizer import Tokenizer

    model = args.model or default_model_path()
    tokenizer = Tokenizer.from_pretrained(model)
    input_len = args.input_len if args.dataset == "random" else None
    requests = make_requests(tokenizer, args.dataset, args.num_prompts, input_len, args.output_len, args.seed)
    spec = {
        "model": model,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        "requests": [{"prompt": r.prompt_token_ids, "output_len": r.output_len} for r in requests],
    }
    workload = {
        "dataset": args.dataset,
        "num_requests": len(requests),
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "output_tokens": sum(r.output_len for r in requests),
        "seed": args.seed,
    }
    fd, path = tempfile.mkstemp(prefix="ember_bench_throughput_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    return path, workload


def run_child(args: list[str]) -> dict[str, Any]:
    """Run one engine; its stderr (progress bars, notes, errors) passes through, stdout carries the result."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *args], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(f"child {args[0]} failed (exit {proc.returncode}); its stderr is above")


def results_table(results: Sequence[dict[str, Any]], workload: dict[str, Any]) -> str:
    base = next((r for r in results if r["engine"] == BASELINE), None)
    lines = [
        f"{workload['num_requests']} requests ({workload['dataset']}), {workload['prompt_tokens']} prompt tokens, "
        f"{workload['output_tokens']} output tokens",
        "",
        f"| engine | setting | elapsed s | output tok/s | total tok/s | req/s | output tok/s vs {BASELINE} |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r['output_tok_s'] / base['output_tok_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['engine']} | {r['setting']} | {r['elapsed_s']:.2f} | {r['output_tok_s']:.1f} "
            f"| {r['total_tok_s']:.1f} | {r['req_s']:.2f} | {ratio} |"
        )
    trials = [f"{r['engine']}: " + ", ".join(f"{t['setting']} {t['elapsed_s']:.2f} s" for t in r["trials"])
              for r in results if len(r["trials"]) > 1]
    if trials:
        lines += ["", "settings tried: " + "; ".join(trials)]
    loads = ", ".join(f"{r['engine']} {r['load_avg_1min_after']}" for r in results)
    lines += [f"load average (1 min) after each engine: {loads}"]
    return "\n".join(lines)


def agreement_note(results: Sequence[dict[str, Any]]) -> str:
    """Share of requests whose first greedy token, and first AGREEMENT_TOKENS tokens, match the first engine's
    (a sanity check of each engine's batching; dtypes and kernels differ, so later tokens may diverge)."""
    ref = results[0]
    notes = []
    for r in results[1:]:
        pairs = list(zip(ref["first_tokens"], r["first_tokens"]))
        first = sum(a[:1] == b[:1] for a, b in pairs)
        whole = sum(a == b for a, b in pairs)
        notes.append(f"{r['engine']}: first token {first}/{len(pairs)}, first {AGREEMENT_TOKENS} tokens {whole}/{len(pairs)}")
    return f"greedy agreement with {ref['engine']}: " + ("; ".join(notes) or "-")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--model", default=None, help="GGUF file (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (random dataset)")
    parser.add_argument("--output-len", type=int, default=None,
                        help="output tokens per request (default: 128; sharegpt: the reply's token count)")
    parser.add_argument("--dataset", choices=("random", "sharegpt"), default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llama-parallel", default="16,32,all",
                        help="llama.cpp parallel sequences to try, comma-separated ('all' = --num-prompts)")
    parser.add_argument("--hf-batch-sizes", default="all,32,16",
                        help="transformers batch sizes to try, comma-separated ('all' = --num-prompts)")
    parser.add_argument("--llama-kv-unified", action="store_true",
                        help="llama.cpp: one KV buffer shared by all sequences (default: one stream each)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="ember's KV cache storage: auto, int8 or fp8_e4m3")
    parser.add_argument("--out", help="write results (and machine info) to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args)
        return
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        sys.exit(f"unknown engine(s): {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    if args.dataset == "random" and args.output_len is None:
        args.output_len = 128
    info = machine_info()
    print_machine(info)
    spec_file, workload = write_workload(args)
    try:
        results = []
        for engine in engines:
            print(f"--- {engine}", file=sys.stderr, flush=True)
            child_args = [engine, "--spec-file", spec_file]
            child_args += ["--llama-parallel", args.llama_parallel, "--hf-batch-sizes", args.hf_batch_sizes]
            child_args += ["--llama-kv-unified"] if args.llama_kv_unified else []
            child_args += ["--kv-cache-dtype", args.kv_cache_dtype]
            results.append(run_child(child_args))
    finally:
        os.unlink(spec_file)
    print(results_table(results, workload))
    print(agreement_note(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": info, "workload": workload, "results": results}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
