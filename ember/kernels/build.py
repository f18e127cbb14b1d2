"""Just-in-time build of ember's C++ kernels (torch.utils.cpp_extension), cached per machine in
~/.cache/torch_extensions. A kernel that cannot be built (no compiler, a CPU without the instructions,
EMBER_DISABLE_KERNELS=1) is None, and callers use their PyTorch fallback."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from functools import cache
from types import ModuleType

logger = logging.getLogger("ember")

# A build that was killed (Ctrl-C, a timeout) leaves torch's lock file behind, and every later process would
# wait on it forever. A real build takes well under this; an older lock is stale.
_STALE_LOCK_S = 300.0


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@cache
def load_kernel(name: str, required_cpu_flag: str) -> ModuleType | None:
    """Build (or load the cached build of) ember/kernels/{name}.cpp as module `ember_{name}`."""
    if os.environ.get("EMBER_DISABLE_KERNELS") == "1" or required_cpu_flag not in _cpu_flags():
        return None
    try:
        from torch.utils.cpp_extension import load

        source = os.path.join(os.path.dirname(__file__), f"{name}.cpp")
        with open(source, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        # One directory per source version: two checkouts (or versions) of ember never rebuild each other's.
        build_dir = os.path.join(os.path.expanduser("~/.cache/ember/kernels"), f"{name}-{digest}")
        os.makedirs(build_dir, exist_ok=True)
        _clear_stale_lock(os.path.join(build_dir, "lock"))
        if not os.path.exists(os.path.join(build_dir, f"ember_{name}.so")):
            logger.info("ember: building the %s kernel (first use on this machine only)", name)
        return load(
            name=f"ember_{name}",
            sources=[source],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
            verbose=False,
        )
    except Exception as e:  # the fallback is always correct, only slower
        logger.warning("ember: %s kernel unavailable (%s); using the PyTorch fallback", name, e)
        return None


def _clear_stale_lock(lock: str) -> None:
    """Wait for another process's build, but remove a lock no build has touched for _STALE_LOCK_S."""
    while True:
        try:
            age = time.time() - os.path.getmtime(lock)
        except OSError:
            return  # no lock
        if age > _STALE_LOCK_S:
            logger.warning("ember: removing a stale kernel build lock %s (%.0f s old)", lock, age)
            try:
                os.remove(lock)
            except OSError:
                pass
            return
        time.sleep(0.5)
