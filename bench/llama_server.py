"""llama.cpp's own server (`llama-server`) for the benchmarks' same-run comparisons: start it on a free port,
wait for /health, post JSON, read /metrics, and time a group of concurrent requests from their `timings`.

Build it from the llama.cpp inside llama-cpp-python's source package (see bench/README.md); the benchmarks
take its path from `LLAMA_SERVER` or `--llama-server`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_command(binary: str, model: str, port: int, slots: int, slot_ctx: int, threads: int = 2) -> list[str]:
    """llama-server on `model`: `threads` threads, flash attention, `slots` parallel slots of `slot_ctx` tokens
    each, /metrics on, no web UI, no prompt cache between requests."""
    return [
        binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads),
        "-fa", "on", "-np", str(slots), "-c", str(slots * slot_ctx), "--metrics", "--no-webui", "--cache-ram", "0",
    ]  # fmt: skip


class LlamaServer:
    """One llama-server process (its output in a temporary log, removed on close)."""

    def __init__(self, command: list[str], port: int, timeout: float = 300) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="ember_bench_llama_server_", suffix=".log", delete=False)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.close()
                raise RuntimeError(f"llama-server exited with {self.process.returncode}: {tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("llama-server did not come up")
            time.sleep(0.3)

    def log_tail(self, lines: int = 8) -> str:
        with open(self.log.name, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-lines:])

    def post(self, path: str, body: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /completion (not streamed), the prompt not cached between requests."""
        return self.post("/completion", {"cache_prompt": False, "stream": False, **body})

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("llamacpp:"):
                name, value = line[len("llamacpp:") :].split()
                values[name] = float(value)
        return values

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log.closed:
            self.log.close()
            os.unlink(self.log.name)


def group_decode(results: list[dict[str, Any]]) -> tuple[float, int]:
    """(decode seconds, decode tokens) of requests run concurrently from the same moment: each request's clock
    starts when its slot starts (all together), prompt_ms to its first token, predicted_ms from there to its
    last. The group decodes from its first first token to its last token; the tokens after each first count."""
    timings = [r["timings"] for r in results]
    begin = min(t["prompt_ms"] for t in timings)
    end = max(t["prompt_ms"] + t["predicted_ms"] for t in timings)
    return (end - begin) / 1000, sum(max(t["predicted_n"] - 1, 0) for t in timings)
