"""The machine's measured ceilings for the roofline: memory read bandwidth and matmul peak per dtype.

Measured once per (CPU, thread count, torch version, device) and cached in ~/.cache/ember/ceilings.json
(EMBER_CACHE moves it), because a benchmark should not spend seconds re-measuring the machine, and a figure
measured on this machine beats a datasheet number: a 2-core VM gets a share of the socket's bandwidth.

- Read bandwidth: the best of several sums over a 1 GiB float32 buffer, far larger than any cache, so every
  byte comes from DRAM. A sum is one load and one add per element: it is bounded by the reads.
- Matmul peak: the best of several square matmuls per dtype (2048 x 2048: large enough that the library's
  GEMM runs at its peak, small enough to take ~20 ms).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ember.model_zoo import cache_dir

_BANDWIDTH_BYTES = 1 << 30
_MATMUL_SIZE = 2048
_REPEATS = 5
MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Ceilings:
    machine: str  # the cache key: CPU, threads, torch version, device
    read_gbs: float  # memory read bandwidth, GB/s (1e9 bytes)
    matmul_gflops: dict[str, float]  # per dtype name, GFLOP/s
    measured_at: str

    def peak_gflops(self, dtype: torch.dtype) -> float:
        """Matmul peak of `dtype` (float16 and quantized compute have no entry: the bf16 figure stands in)."""
        name = str(dtype).removeprefix("torch.")
        return self.matmul_gflops.get(name, self.matmul_gflops["bfloat16"])


def machine_key(device: torch.device) -> str:
    return f"{_cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__} | {device.type}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best_seconds(run: Callable[[], object], device: torch.device, repeats: int = _REPEATS) -> float:
    run()  # warm-up: page faults, thread pool, library dispatch
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_read_gbs(device: torch.device, num_bytes: int = _BANDWIDTH_BYTES) -> float:
    buffer = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    seconds = _best_seconds(lambda: buffer.sum(), device)
    return num_bytes / seconds / 1e9


def measure_matmul_gflops(dtype: torch.dtype, device: torch.device, size: int = _MATMUL_SIZE) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = _best_seconds(lambda: a @ b, device)
    return 2 * size**3 / seconds / 1e9


def measure(device: torch.device) -> Ceilings:
    return Ceilings(
        machine=machine_key(device),
        read_gbs=measure_read_gbs(device),
        matmul_gflops={name: measure_matmul_gflops(dtype, device) for name, dtype in MATMUL_DTYPES.items()},
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def ceilings_path() -> Path:
    return cache_dir() / "ceilings.json"


def machine_ceilings(device: torch.device | str = "cpu", remeasure: bool = False, path: Path | None = None) -> Ceilings:
    """This machine's ceilings: from the cache, or measured now (and cached) when absent or `remeasure`."""
    device = torch.device(device)
    path = path or ceilings_path()
    key = machine_key(device)
    cached: dict[str, dict] = {}
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass  # no cache yet, or a damaged one: measure
    entry = cached.get(key)
    if entry is not None and not remeasure:
        try:
            return Ceilings(**entry)
        except TypeError:
            pass  # written by another version: measure again
    ceilings = measure(device)
    cached[key] = asdict(ceilings)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(cached, indent=2), encoding="utf-8")
    os.replace(temporary, path)  # atomic: a concurrent reader sees the old file or the new one
    return ceilings
