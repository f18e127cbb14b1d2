"""Hugging Face architecture name -> ember model class."""

from __future__ import annotations

from ember.errors import UnsupportedModelError
from ember.models.base import CausalLM
from ember.models.gemma3 import Gemma3ForCausalLM
from ember.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}


def model_class(architecture: str) -> type[CausalLM]:
    if architecture not in MODEL_REGISTRY:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise UnsupportedModelError(f"architecture {architecture!r} is not supported (supported: {supported})")
    return MODEL_REGISTRY[architecture]
