"""Find a model by path, build its config and module, and stream its weights in."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ember.config import ModelConfig
from ember.errors import ModelNotFoundError
from ember.loader import gguf as gguf_loader
from ember.loader.gguf_file import GGUFFile
from ember.loader import safetensors as st_loader
from ember.models.base import CausalLM
from ember.models.registry import model_class
from ember.quant.config import QuantConfig, apply_quant_config


@dataclass
class ModelSource:
    """A resolved model: its kind ("gguf" or "hf"), path, config, (GGUF) the open file, and (ember
    quantized checkpoints) the checkpoint's `quantization_config`."""

    kind: str
    path: str
    config: ModelConfig
    gguf_file: GGUFFile | None = None
    quantization_config: dict | None = None


def resolve_model(path: str) -> ModelSource:
    """Check the path is a model ember can read and build its config (no weights read yet)."""
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model path {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise ModelNotFoundError(f"model path {path!r} is not readable")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ModelNotFoundError(f"{path!r} is not a model folder (no config.json)")
        quant = st_loader.quantization_config_of(path)
        return ModelSource("hf", path, st_loader.model_config_from_folder(path), quantization_config=quant)
    if not path.endswith(".gguf"):
        raise ModelNotFoundError(f"{path!r} is neither a .gguf file nor a Hugging Face model folder")
    gguf_file = gguf_loader.open_gguf(path)
    return ModelSource("gguf", path, gguf_loader.model_config_from_gguf(gguf_file), gguf_file)


def load_model(
    source: ModelSource, dtype: torch.dtype, device: str | torch.device, quant: QuantConfig | None = None
) -> CausalLM:
    """Instantiate the model in `dtype` on `device` and load its weights tensor by tensor.

    `quant` picks each layer's weight method (see ember.quant.config); the default QuantConfig() is
    all float (GGUF blocks dequantized), which is what callers that compare with a float reference want.
    """
    quant = quant or QuantConfig()
    if source.kind == "hf" and source.quantization_config is None:
        quant = quant.for_float_source()
    cls = model_class(source.config.architecture)
    with _default_dtype(dtype), torch.device(device):
        model = cls(source.config)
        apply_quant_config(model, quant)
    weights, total = _weights(source, keep_quantized=not quant.is_float)
    desc = "Loading weights"
    if quant.quantizes_on_load:
        desc += f" (quantizing: layers {quant.linear.description}, LM head {quant.lm_head.description})"
    model.load_weights(tqdm(weights, total=total, desc=desc, unit="tensor", leave=False))
    return model.eval()


def _weights(source: ModelSource, keep_quantized: bool) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    if source.kind == "gguf":
        gguf_file = source.gguf_file or gguf_loader.open_gguf(source.path)
        return gguf_loader.iter_gguf_tensors(gguf_file, source.config, keep_quantized), len(gguf_file.tensors)
    files = st_loader.safetensors_files(source.path)
    if source.quantization_config is not None:
        from ember.quant.checkpoint import iter_quantized_checkpoint

        return iter_quantized_checkpoint(files)
    return st_loader.iter_safetensors(files), st_loader.count_tensors(files)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created directly in the target dtype (no float32 copy of the whole model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
