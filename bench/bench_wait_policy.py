#!/usr/bin/env python
"""OpenMP wait settings, old (OMP_WAIT_POLICY=ACTIVE) against ember's default (a bounded GOMP_SPINCOUNT, see
ember/openmp.py) and any others given, in the same run:

- small-op latency: median of a 1x640 @ 640x640 bf16 matmul and of an elementwise add of 64K floats (just
  above ATen's parallel grain), back to back and after a 1 ms pause, 2 threads;
- single-stream decode tok/s on the default model: 32-token prompt, 128 new tokens, greedy, EOS ignored,
  1000 / TPOT, through the code of `ember bench latency`;
- idle CPU of a started `ember serve` (default model) over 5 s after one request, from /proc/<pid>/stat (its own
  CPU time, which other load does not inflate), and before that the median decode rate of three 128-token
  requests through the server (prefill included; its step loop runs in a thread of its own).

libgomp reads its environment when torch loads, so each setting has its own worker process with the model loaded.
The workers take turns, one round after another, and the ones not measuring are stopped (SIGSTOP: no CPU, no
spinning), so each round compares the settings seconds apart under the same load from other processes. Reported:
the median over rounds (and the range), and the median of the per-round decode ratios against the old setting.

    python bench/bench_wait_policy.py                                   # old vs new, 8 rounds
    python bench/bench_wait_policy.py --rounds 12 --also GOMP_SPINCOUNT=10000 OMP_WAIT_POLICY=PASSIVE
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
RESULT_PREFIX = "WAIT_RESULT "
IDLE_SECONDS = 5.0
PROMPT_TOKENS, DECODE_TOKENS = 32, 128


def parse_setting(text: str) -> dict[str, str]:
    """'A=1,B=2' -> {'A': '1', 'B': '2'}."""
    return dict(item.split("=", 1) for item in text.split(",") if item)


def child_env(setting: dict[str, str]) -> dict[str, str]:
    """This environment without any wait variable, plus the setting's ({} = ember's own default)."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    return env | setting | {"PYTHONUNBUFFERED": "1"}


# -- the worker (one process per setting) ---------------------------------------------------------


def median_ms(op: Callable[[], object], calls: int, pause_s: float = 0.0) -> float:
    for _ in range(50):
        op()
    times = []
    for _ in range(calls):
        if pause_s:
            time.sleep(pause_s)
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def worker(calls: int) -> None:
    """Load the default model, then answer each line on stdin with one round of measurements."""
    import ember  # noqa: F401  (its OpenMP settings, before torch loads, as in real use)
    import torch

    from ember import LLM
    from ember.benchmark import run_latency

    torch.set_num_threads(2)
    x, w = torch.randn(1, 640, dtype=torch.bfloat16), torch.randn(640, 640, dtype=torch.bfloat16)
    a, b, out = torch.randn(65536), torch.randn(65536), torch.empty(65536)
    llm = LLM(kv_cache_memory=1.0)
    for seed, _ in enumerate(sys.stdin):
        latency = run_latency(llm, PROMPT_TOKENS, DECODE_TOKENS, 1, num_iters=1, num_warmup=0, seed=seed, use_tqdm=False)
        row = {
            "matmul_ms": median_ms(lambda: torch.matmul(x, w), calls),
            "add_ms": median_ms(lambda: torch.add(a, b, out=out), calls),
            "matmul_after_1ms_ms": median_ms(lambda: torch.matmul(x, w), calls // 4, pause_s=1e-3),
            "decode_tok_s": 1000.0 / latency.tpot_ms.p50,
        }
        print(RESULT_PREFIX + json.dumps(row), flush=True)


class Worker:
    def __init__(self, env: dict[str, str], calls: int) -> None:
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(calls)], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
        )

    def measure(self) -> dict[str, float]:
        os.kill(self.process.pid, signal.SIGCONT)
        try:
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
            for line in self.process.stdout:
                if line.startswith(RESULT_PREFIX):
                    return json.loads(line[len(RESULT_PREFIX):])
            self.log.seek(0)
            raise RuntimeError(f"the worker exited with {self.process.wait()}:\n{self.log.read()[-3000:]}")
        finally:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGSTOP)

    def close(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
        self.process.wait()
        self.log.close()


# -- the idle server --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def wait_ready(url: str, process: subprocess.Popen, log: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log) as f:
                raise RuntimeError(f"ember serve exited with {process.returncode}:\n{f.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"ember serve did not come up in {timeout_s:.0f} s (log: {log})")


def idle_server(env: dict[str, str]) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = os.path.join(tempfile.gettempdir(), f"bench-wait-policy-serve-{port}.log")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ember.cli", "serve", "--port", str(port)], env=env, stdout=out, stderr=out
        )
    try:
        wait_ready(url, process, log)
        body = {"prompt": "The lighthouse keeper", "max_tokens": DECODE_TOKENS, "ignore_eos": True, "temperature": 0}
        post_json(url + "/v1/completions", body | {"max_tokens": 8})  # warm-up
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            post_json(url + "/v1/completions", body)
            rates.append(DECODE_TOKENS / (time.perf_counter() - start))
        time.sleep(1.0)
        cpu0, t0 = cpu_seconds(process.pid), time.monotonic()
        time.sleep(IDLE_SECONDS)
        cpu1, t1 = cpu_seconds(process.pid), time.monotonic()
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"server_tok_s": statistics.median(rates), "idle_cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0)}


# -- report -----------------------------------------------------------------------------------------

COLUMNS = [
    ("matmul_ms", "1x640 matmul ms"), ("add_ms", "add 64K ms"), ("matmul_after_1ms_ms", "matmul after 1 ms pause ms"),
    ("decode_tok_s", "decode tok/s"), ("decode_vs_old", "decode vs old (per round)"),
    ("server_tok_s", "server tok/s"), ("idle_cpu_pct", "idle CPU % of a core"),
]


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| setting | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, rounds in results.items():
        cells = [cell([r[key] for r in rounds if key in r]) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_rounds(settings: dict[str, dict[str, str]], rounds: int, calls: int) -> dict[str, list[dict[str, float]]]:
    workers = {name: Worker(child_env(setting), calls) for name, setting in settings.items()}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    try:
        for worker_ in workers.values():
            worker_.measure()  # warm-up: model loaded, kernels built, thread pools started
        names = list(settings)
        for index in range(rounds):
            order = names if index % 2 == 0 else names[::-1]  # neither setting always goes first
            row = {name: workers[name].measure() | {"load_avg_1min": os.getloadavg()[0]} for name in order}
            for name in names:
                row[name]["decode_vs_old"] = row[name]["decode_tok_s"] / row[names[0]]["decode_tok_s"]
                results[name].append(row[name])
            print(f"round {index + 1}/{rounds}: {json.dumps(row)}", file=sys.stderr, flush=True)
    finally:
        for worker_ in workers.values():
            worker_.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="turns of every setting (default: 8)")
    parser.add_argument("--also", nargs="*", default=[], help="more settings, each 'VAR=value[,VAR=value]'")
    parser.add_argument("--calls", type=int, default=2000, help="small-op calls per median (default: 2000)")
    parser.add_argument("--server-rounds", type=int, default=2, help="servers started per setting (default: 2)")
    parser.add_argument("--no-server", action="store_true", help="skip the idle server measurement")
    parser.add_argument("--out", help="also write the raw results to this JSON file")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return

    from ember.openmp import SPIN_COUNT

    settings = {"OMP_WAIT_POLICY=ACTIVE (old)": {"OMP_WAIT_POLICY": "ACTIVE"},
                f"ember default (GOMP_SPINCOUNT={SPIN_COUNT})": {}}
    settings |= {text: parse_setting(text) for text in args.also}
    results = run_rounds(settings, args.rounds, args.calls)
    for index in range(0 if args.no_server else args.server_rounds):
        for name, setting in settings.items():  # one at a time: they must not share the cores
            results[name][index] |= idle_server(child_env(setting))
            print(f"server {name}: {json.dumps(results[name][index])}", file=sys.stderr, flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
