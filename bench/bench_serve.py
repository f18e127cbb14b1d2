"""Serving benchmark: `ember bench serve`'s load generator against ember's server and llama.cpp's, one
after the other on the same machine, same model, same prompts, at several request rates.

Servers (each started here, warmed up with a few requests, measured, then stopped):
- ember:             `ember serve` (continuous batching over the paged KV cache), GGUF weights kept quantized
- ember-bf16:        the same with the weights dequantized to bfloat16 (`--quantization none`)
- llama-server:      llama.cpp's own server binary with parallel slots (`--parallel`, continuous batching);
                     build it from llama.cpp's source (see bench/README.md) and pass --llama-server-bin
- llama-cpp-python:  `python -m llama_cpp.server` (llama-cpp-python[server]); it runs one request at a time

Example:
    python bench/bench_serve.py --servers ember,llama-server --rates 1,4,16,inf --num-prompts 48 \
        --llama-server-bin /path/to/llama-server --output-json serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from types import SimpleNamespace

import ember  # noqa: F401  (OpenMP wait policy before torch)
from ember.bench_serve import build_requests, load_tokenizer, result_table, run_load, summarize_run
from ember.model_zoo import default_model_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(kind: str, model: str, port: int, args: argparse.Namespace) -> list[str]:
    if kind in ("ember", "ember-bf16"):  # ember: the GGUF's weights kept quantized; ember-bf16: dequantized
        return [sys.executable, "-m", "ember.cli", "serve", "--model", model, "--port", str(port),
                "--served-model-name", "model", "--max-num-seqs", str(args.max_num_seqs),
                "--max-waiting-requests", "100000", "--quantization", "auto" if kind == "ember" else "none"]
    if kind == "llama-server":
        return [args.llama_server_bin, "-m", model, "--port", str(port), "-t", "2", "-tb", "2",
                "--parallel", str(args.parallel), "-c", str(args.parallel * args.slot_ctx), "-fa", "on",
                "--cont-batching", "--alias", "model", "--no-webui"]
    if kind == "llama-cpp-python":
        return [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port),
                "--n_threads", "2", "--n_threads_batch", "2", "--n_ctx", str(args.slot_ctx), "--flash_attn", "true",
                "--model_alias", "model"]
    raise SystemExit(f"unknown server {kind}")


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="ember,llama-server")
    parser.add_argument("--model", default=None, help="GGUF (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--rates", default="1,4,16,inf")
    parser.add_argument("--dataset", default="sharegpt", choices=("sharegpt", "random"))
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=128, help="tokens per request (0: the ShareGPT reply length)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="ember: sequences per batch")
    parser.add_argument("--parallel", type=int, default=16, help="llama-server: parallel slots")
    parser.add_argument("--slot-ctx", type=int, default=2048, help="llama.cpp: context per slot")
    parser.add_argument("--llama-server-bin", default=os.environ.get("LLAMA_SERVER_BIN", "llama-server"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    model = args.model or default_model_path()
    rates = [float(r) for r in args.rates.split(",")]
    tokenizer = load_tokenizer(model)
    requests = build_requests(SimpleNamespace(
        dataset=args.dataset, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len or None, seed=args.seed,
    ), tokenizer)
    warmup = build_requests(SimpleNamespace(
        dataset="random", num_prompts=4, input_len=16, output_len=8, seed=args.seed + 1,
    ), tokenizer)
    # Every server gets ignore_eos; the ones that don't know it (llama-cpp-python) get EOS banned via logit_bias,
    # so all produce the requested number of tokens.
    eos_ids = tokenizer.eos_token_ids
    extra = {"logit_bias": {str(i): -100 for i in eos_ids}}
    report: dict = {"model": model, "num_prompts": args.num_prompts, "dataset": args.dataset,
                    "output_len": args.output_len, "load": os.getloadavg(), "runs": []}
    for kind in args.servers.split(","):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(f"/tmp/bench-serve-{kind}.log", "w")
        process = subprocess.Popen(server_command(kind, model, port, args), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, process)
            asyncio.run(run_load(url + "/v1/completions", "model", warmup, float("inf"), None, {}, 0, use_tqdm=False))
            for rate in rates:
                results, duration = asyncio.run(
                    run_load(url + "/v1/completions", "model", requests, rate, None, extra, args.seed)
                )
                summary = asdict(summarize_run(results, duration, tokenizer))
                print(f"\n== {kind}, request rate {rate} ==\n{result_table(summary)}", flush=True)
                report["runs"].append({"server": kind, "rate": str(rate), **summary})
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
    print("\n| server | rate | ok | out tokens | out tok/s | req/s | TTFT mean / p99 ms | TPOT mean / p99 ms | ITL p99 ms | E2E mean ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(f"| {r['server']} | {r['rate']} | {r['completed']} | {r['total_output_tokens']} | {r['output_throughput']:.1f} | "
              f"{r['request_throughput']:.2f} | {r['ttft']['mean_ms']:.0f} / {r['ttft']['p99_ms']:.0f} | "
              f"{r['tpot']['mean_ms']:.1f} / {r['tpot']['p99_ms']:.1f} | {r['itl']['p99_ms']:.1f} | "
              f"{r['e2e']['mean_ms']:.0f} |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
