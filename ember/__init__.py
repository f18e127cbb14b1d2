"""ember: a fast LLM inference and serving engine for the CPU."""

import os

# OpenMP's default wait policy lets every small parallel op sleep and wake its threads (~8 ms per
# 1x640 matmul on 2 cores); spinning briefly is what decode needs. It must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

from ember.engine.llm import LLM  # noqa: E402
from ember.outputs import CompletionOutput, RequestOutput  # noqa: E402
from ember.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
