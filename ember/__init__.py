"""ember: a fast LLM inference and serving engine for the CPU."""

from ember.openmp import set_wait_policy

set_wait_policy()  # before torch loads: libgomp reads its environment only then

from ember.engine.llm import LLM  # noqa: E402
from ember.outputs import CompletionOutput, RequestOutput  # noqa: E402
from ember.sampling_params import BeamSearchParams, SamplingParams, StepBoundary  # noqa: E402

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "StepBoundary", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
