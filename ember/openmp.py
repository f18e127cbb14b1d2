"""How ember's OpenMP threads wait between parallel regions. libgomp (the OpenMP runtime of torch's CPU
wheel, and of ember's kernels) reads these variables once, when torch loads, so this runs before that."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# Iterations an OpenMP thread with no work spins before it sleeps on a futex: a couple of milliseconds on current
# x86 cores. The gaps between a decode step's parallel regions are shorter, so while decoding the threads almost
# never sleep and pay a wake-up (which is what small ops lose under the default policy), yet an idle server stops
# spinning within milliseconds. OMP_WAIT_POLICY=ACTIVE spins for minutes: an idle server kept a core busy, and its
# idle loading thread's pool took CPU from the step loop's. Measurements: BENCHMARKS.md, "OpenMP wait policy".
SPIN_COUNT = 100_000


def set_wait_policy(environ: MutableMapping[str, str] = os.environ) -> None:
    """Bound the spin with GOMP_SPINCOUNT, unless the user chose a wait policy or spin count themselves."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
