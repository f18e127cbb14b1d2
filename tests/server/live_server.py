"""Start `ember serve` as a real subprocess on a free localhost port, and stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, *args: str, startup_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = f"/tmp/ember-serve-{self.port}.log"
        key = args[args.index("--api-key") + 1] if "--api-key" in args else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ember.cli", "serve", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ember serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ember serve did not come up in {startup_timeout} s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def metric(self, name: str, default: float | None = None) -> float:
        """The value of the first series of /metrics whose name (and, if given, leading labels) match:
        `metric("ember:num_requests_running")`, `metric('ember:request_success_total{finished_reason="length"')`."""
        for line in httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text.splitlines():
            if line.startswith(name) and line[len(name)] in "{ ,":
                return float(line.rsplit(" ", 1)[1])
        if default is not None:
            return default
        raise KeyError(name)

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no request is running or waiting."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric("ember:num_requests_running") == 0 and self.metric("ember:num_requests_waiting") == 0:
                return
            time.sleep(0.05)
        raise AssertionError("server did not become idle")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
