"""Inference-time scaling benchmark: the same sweep as `ember bench scaling` (see ember/scaling/bench.py).

    python bench/bench_scaling.py                      # Qwen2.5-Coder 0.5B and 1.5B, HumanEval + arithmetic, N 1..16
    python bench/bench_scaling.py --quick              # smoke run: 0.5B, 2 problems per task, N = 1,2,4
    python bench/bench_scaling.py --models 0.5b --reward-model 1.5b --output-json scaling.json
"""

from __future__ import annotations

import ember  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from ember.scaling.bench import main

if __name__ == "__main__":
    main()
