"""Just-in-time build of ember's C++ kernels (torch.utils.cpp_extension), cached per machine in
~/.cache/ember/kernels (EMBER_CACHE moves it). A kernel that cannot be built (no compiler, a CPU without the
instructions, EMBER_DISABLE_KERNELS=1) is None, and callers use their PyTorch fallback.

A build must survive being killed, and other processes starting meanwhile:
- one process builds a kernel version at a time, under an OS file lock (flock) that the kernel releases when
  its holder dies, so a killed build leaves no lock behind; a process that waits says so, with the holder's pid;
- the compiler runs in a child process in a session of its own, which stops its ninja (and ninja its compilers)
  when the building process dies;
- each build has a private directory, and the finished module is moved into place by one rename: a half-built
  module is never loaded, and a compiler that outlives its builder writes only where nobody looks.
"""

from __future__ import annotations

import ctypes
import fcntl
import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from types import ModuleType

from ember.model_zoo import cache_dir

logger = logging.getLogger("ember")

CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
_WAIT_LOG_EVERY_S = 30.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def target_arch() -> str:
    """The -march kernels are built for: native, or EMBER_KERNEL_MARCH (x86-64-v3 builds the AVX2 paths on an
    AVX-512 CPU, so both are tested on one machine)."""
    return os.environ.get("EMBER_KERNEL_MARCH", "native")


def cpu_supports(required: str | tuple[str, ...]) -> bool:
    """`required`: one CPU feature set ("avx2 fma f16c": every flag of /proc/cpuinfo named), or a tuple of
    alternative sets (a kernel with an AVX-512 and an AVX2 path), any one of which suffices."""
    flags = _cpu_flags()
    alternatives = (required,) if isinstance(required, str) else required
    return any(set(alternative.split()) <= flags for alternative in alternatives)


@cache
def load_kernel(name: str, required_cpu_flags: str | tuple[str, ...]) -> ModuleType | None:
    """Build (or load the cached build of) ember/kernels/{name}.cpp as module `ember_{name}`, on a CPU with
    `required_cpu_flags` (see `cpu_supports`); the source picks its code path from the -march macros."""
    if os.environ.get("EMBER_DISABLE_KERNELS") == "1" or not cpu_supports(required_cpu_flags):
        return None
    try:
        return _build_or_load(name)
    except Exception as e:  # the fallback is always correct, only slower
        logger.warning("ember: %s kernel unavailable (%s); using the PyTorch fallback", name, e)
        return None


def _build_or_load(name: str) -> ModuleType:
    import torch  # noqa: F401  (the module links against the libtorch that torch loads)

    source = os.path.join(os.path.dirname(__file__), f"{name}.cpp")
    digest = _source_digest(source)
    # One directory per source version and target: two checkouts (or versions) never rebuild each other's.
    arch = target_arch()
    build_dir = os.path.join(cache_dir(), "kernels", f"{name}-{digest}" + ("" if arch == "native" else f"-{arch}"))
    module_path = os.path.join(build_dir, f"ember_{name}.so")
    if not os.path.exists(module_path):
        os.makedirs(build_dir, exist_ok=True)
        with _build_lock(os.path.join(build_dir, "build.lock"), name):
            if not os.path.exists(module_path):  # else built while we waited
                _build(name, source, build_dir)
    return _import(f"ember_{name}", module_path)


def _source_digest(source: str) -> str:
    """The kernel's source and every header beside it (a shared header changes each kernel that includes it)."""
    h = hashlib.sha256()
    for path in [source, *sorted(glob.glob(os.path.join(os.path.dirname(source), "*.h")))]:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


@contextmanager
def _build_lock(path: str, name: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (which names the holder's pid), logging while another process holds it."""
    with open(path, "a+") as f:
        waited_since = time.monotonic()
        next_log = waited_since
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= next_log:
                    f.seek(0)
                    holder = f.read().strip() or "unknown"
                    logger.warning(
                        "ember: waiting for another process's kernel build of %s (pid %s, %.0f s so far); "
                        "lock %s", name, holder, time.monotonic() - waited_since, path,
                    )
                    next_log += _WAIT_LOG_EVERY_S
                time.sleep(0.1)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(name: str, source: str, build_dir: str) -> None:
    """Compile in a fresh private directory (in a child process), then move the module into place."""
    for leftover in glob.glob(os.path.join(build_dir, "build-*")):  # from builders that were killed
        shutil.rmtree(leftover, ignore_errors=True)
    private = tempfile.mkdtemp(prefix="build-", dir=build_dir)
    logger.warning("ember: building the %s kernel (first use on this machine only; about a minute)", name)
    try:
        _run_builder(name, source, private)
        os.replace(os.path.join(private, f"ember_{name}.so"), os.path.join(build_dir, f"ember_{name}.so"))
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _run_builder(name: str, source: str, directory: str) -> None:
    command = [
        sys.executable, "-c", "import sys; from ember.kernels.build import build_in_child; build_in_child(sys.argv[1:])",
        name, source, directory, str(os.getpid()),
    ]
    # Its own session: a Ctrl-C to our terminal reaches us, and we stop the child, rather than both at once.
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = child.communicate()
    except BaseException:
        child.terminate()  # its handler stops ninja and the compilers too
        child.wait()
        raise
    if child.returncode != 0:
        lines = output.decode(errors="replace").strip().splitlines()
        raise RuntimeError("build failed: " + " | ".join(lines[-20:]))


def build_in_child(argv: list[str]) -> None:
    """The builder process: torch's JIT build into `directory`. Its lock file there is ours alone."""
    name, source, directory, parent_pid = argv
    _die_with_parent(int(parent_pid))
    from torch.utils.cpp_extension import load

    cflags = [*CFLAGS, f"-march={target_arch()}"]
    load(name=f"ember_{name}", sources=[source], extra_cflags=cflags, extra_ldflags=LDFLAGS,
         build_directory=directory, verbose=False)


def _die_with_parent(parent_pid: int) -> None:
    """On SIGTERM, or when the parent dies (even by SIGKILL), stop this process group: ninja, which is in it, then
    stops the compilers it started in groups of their own."""

    def stop_group(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.killpg(0, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_group)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        stop_group(signal.SIGTERM, None)


def _import(module_name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
