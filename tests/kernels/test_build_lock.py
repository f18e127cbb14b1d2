"""Kernel builds survive a killed builder (ember/kernels/build.py): the next process builds at once, with no lock
left behind and no compiler of the killed build still running; a process waiting for a live build says so."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember.kernels.build import _cpu_flags

# The smallest kernel source ember has for a common CPU: most of its build time is torch's headers.
KERNEL, CPU_FLAG = "fused_ops", "avx512f"
LOAD = f"from ember.kernels.build import load_kernel; m = load_kernel({KERNEL!r}, {CPU_FLAG!r}); print('LOADED', m)"

pytestmark = pytest.mark.skipif(
    CPU_FLAG not in _cpu_flags() or not shutil.which("ninja") or not shutil.which("c++"),
    reason=f"needs {CPU_FLAG}, ninja and a C++ compiler",
)


def _start_loader(cache: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "EMBER_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("EMBER_DISABLE_KERNELS", None)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _processes_in(directory: Path) -> list[str]:
    """'pid name' of every process working in `directory` (ninja and the compilers it starts run in the build's)."""
    found = []
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            if os.readlink(f"{proc}/cwd").startswith(str(directory)):
                found.append(f"{proc[6:]} {Path(proc, 'comm').read_text().strip()}")
        except OSError:
            pass  # gone, or not ours
    return found


@dataclass
class Rebuilt:
    cache: Path
    survivors: list[str]  # processes of the killed build still running 15 s after the kill
    log: str  # of the process started after the kill
    started_building_s: float  # from its start to its "building" line
    ready_s: float  # from its start to the kernel loaded


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Rebuilt:
    """Start a build in a fresh cache, SIGKILL it while the compiler runs, then start another process."""
    root = tmp_path_factory.mktemp("kernel-cache")
    cache = root / "cache"
    first = _start_loader(cache, root / "first.log")
    compiling = lambda: any(not p.endswith(" ninja") for p in _processes_in(cache))  # noqa: E731
    assert _wait_for(compiling, 180), "the first build never started:\n" + (root / "first.log").read_text()
    time.sleep(1.0)  # well inside the compile, which takes tens of seconds
    first.kill()
    first.wait()
    _wait_for(lambda: not _processes_in(cache), 15)
    survivors = _processes_in(cache)

    log = root / "second.log"
    start = time.monotonic()
    second = _start_loader(cache, log)
    assert _wait_for(lambda: "building the" in log.read_text(), 120), log.read_text()
    started_building_s = time.monotonic() - start
    second.wait(timeout=900)
    return Rebuilt(cache, survivors, log.read_text(), started_building_s, time.monotonic() - start)


def test_a_build_killed_midway_leaves_no_lock_and_no_compiler(rebuilt: Rebuilt) -> None:
    assert rebuilt.survivors == [], "the killed build's ninja/compilers kept running"
    assert "waiting for another process" not in rebuilt.log  # the dead builder's flock went with it
    # Importing ember and torch takes seconds on a loaded machine; waiting on a dead lock would take minutes.
    assert rebuilt.started_building_s < 60, f"the build started only after {rebuilt.started_building_s:.0f} s"
    [module] = glob.glob(str(rebuilt.cache / "kernels" / f"{KERNEL}-*" / f"ember_{KERNEL}.so"))
    assert f"LOADED <module 'ember_{KERNEL}' from '{module}'>" in rebuilt.log, rebuilt.log
    assert not glob.glob(str(rebuilt.cache / "kernels" / "*" / "build-*")), "private build directories left behind"
    print(f"build started {rebuilt.started_building_s:.1f} s after the restart, kernel ready at {rebuilt.ready_s:.1f} s")


def test_waiting_for_a_live_build_is_logged_and_uses_its_result(rebuilt: Rebuilt, tmp_path: Path) -> None:
    [built] = glob.glob(str(rebuilt.cache / "kernels" / f"{KERNEL}-*" / f"ember_{KERNEL}.so"))
    build_dir = tmp_path / "cache" / "kernels" / Path(built).parent.name
    build_dir.mkdir(parents=True)
    log = tmp_path / "waiter.log"
    with open(build_dir / "build.lock", "a+") as lock:  # this test plays the process that is building
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(str(os.getpid()))
        lock.flush()
        waiter = _start_loader(tmp_path / "cache", log)
        line = f"waiting for another process's kernel build of {KERNEL} (pid {os.getpid()}"
        assert _wait_for(lambda: line in log.read_text(), 120), log.read_text()
        shutil.copy(built, build_dir / f"{KERNEL}.tmp")
        os.replace(build_dir / f"{KERNEL}.tmp", build_dir / f"ember_{KERNEL}.so")  # "our" build is done
    waiter.wait(timeout=120)
    output = log.read_text()
    assert "LOADED <module" in output, output
    assert "building the" not in output  # it loaded the build it waited for instead of building again
