"""An idle `ember serve` sleeps: its OpenMP threads stop spinning soon after the last step (ember/openmp.py)."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from ember.openmp import SPIN_COUNT, set_wait_policy
from live_server import LiveServer

IDLE_S = 5.0


def _cpu_seconds(pid: int) -> float:
    """The process's own CPU time (all threads): other load on the machine does not inflate it."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_server_uses_under_5_percent_of_a_core(checkpoint_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # ember's own default, as for a user who set neither
        monkeypatch.delenv(name, raising=False)
    server = LiveServer("--model", checkpoint_dir("llama"))
    try:
        body = {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=120).status_code == 200
        time.sleep(1.0)  # the spin after the last parallel op lasts milliseconds
        before, start = _cpu_seconds(server.process.pid), time.monotonic()
        time.sleep(IDLE_S)
        used, elapsed = _cpu_seconds(server.process.pid) - before, time.monotonic() - start
    finally:
        server.stop()
    assert used / elapsed < 0.05, f"idle server used {100 * used / elapsed:.1f}% of a core over {elapsed:.1f} s"


def test_wait_policy_default_respects_the_users_settings() -> None:
    assert _applied({}) == {"GOMP_SPINCOUNT": str(SPIN_COUNT)}
    assert _applied({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert _applied({"OMP_WAIT_POLICY": "PASSIVE"}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert _applied({"GOMP_SPINCOUNT": "0"}) == {"GOMP_SPINCOUNT": "0"}


def _applied(environ: dict[str, str]) -> dict[str, str]:
    set_wait_policy(environ)
    return environ
