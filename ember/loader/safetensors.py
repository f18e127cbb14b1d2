"""Hugging Face folders: config.json (+ generation_config.json) and safetensors, single or sharded."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open

from ember.config import ModelConfig
from ember.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CorruptModelError(f"{path}: invalid JSON ({e})") from e
    except OSError as e:
        raise ModelNotFoundError(f"{path}: cannot read ({e.strerror})") from e


def model_config_from_folder(folder: str) -> ModelConfig:
    raw = read_json(os.path.join(folder, "config.json"))
    if "ember_model_config" in raw:  # an ember checkpoint of a model that had no HF config (a GGUF)
        from ember.quant.checkpoint import model_config_from_dict

        config = model_config_from_dict(raw["ember_model_config"])
    else:
        config = ModelConfig.from_hf_dict(raw)
    generation_path = os.path.join(folder, "generation_config.json")
    if os.path.exists(generation_path):
        eos = read_json(generation_path).get("eos_token_id")
        extra = [eos] if isinstance(eos, int) else list(eos or [])
        config.eos_token_ids = list(dict.fromkeys(config.eos_token_ids + extra))
    return config


def quantization_config_of(folder: str) -> dict[str, Any] | None:
    """The `quantization_config` of an ember quantized checkpoint; None for a float checkpoint.
    Other producers' formats (GPTQ, AWQ, bitsandbytes exports) are refused by name."""
    quant = read_json(os.path.join(folder, "config.json")).get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method != "ember":
        raise UnsupportedModelError(
            f"{folder}: checkpoints quantized with {method!r} are not supported; ember loads float checkpoints, "
            "GGUF files and its own quantized checkpoints (ember quantize / save_quantized)"
        )
    return quant


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [os.path.join(folder, s) for s in shards]
    else:
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder}: no .safetensors weights found")
    for path in files:
        if not os.path.exists(path):
            raise CorruptModelError(f"{path}: listed in the index but missing")
    return files


def count_tensors(files: list[str]) -> int:
    total = 0
    for path in files:
        with _open(path) as f:
            total += len(list(f.keys()))
    return total


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time from memory-mapped files."""
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise CorruptModelError(f"{path}: cannot read tensor {name} ({e})") from e
                yield _strip_prefix(name), tensor


def _strip_prefix(name: str) -> str:
    """Multimodal exports keep the text model under `language_model`; ember runs the text part."""
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    return name.removeprefix("language_model.")


def _open(path: str):  # noqa: ANN202 - safetensors' handle type is private
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise CorruptModelError(f"{path}: not a valid safetensors file ({e})") from e
