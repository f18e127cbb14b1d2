"""Just-in-time build of ember's C++ kernels (torch.utils.cpp_extension), cached per machine in
~/.cache/torch_extensions. A kernel that cannot be built (no compiler, a CPU without the instructions,
EMBER_DISABLE_KERNELS=1) is None, and callers use their PyTorch fallback."""

from __future__ import annotations

import logging
import os
from functools import cache
from types import ModuleType

logger = logging.getLogger("ember")


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

        logger.info("ember: building the %s kernel (first use on this machine only)", name)
        return load(
            name=f"ember_{name}",
            sources=[os.path.join(os.path.dirname(__file__), f"{name}.cpp")],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # the fallback is always correct, only slower
        logger.warning("ember: %s kernel unavailable (%s); using the PyTorch fallback", name, e)
        return None
