"""Quantized checkpoints: save a loaded (quantized) model as a folder that `LLM(folder)` loads as is.

Folder layout (a Hugging Face-style folder, so tokenizers and tools find what they expect):

* ``model.safetensors``: float tensors under their Hugging Face names (norms, biases, float layers,
  fused layers split back into q/k/v and gate/up), and for each quantized layer ``M`` its packed
  segments as ``M.weight.q{i}.{qweight,scales,offsets}`` (the `ember.kernels.quant_linear` packed
  layout) or ``M.weight.q{i}.float``. The safetensors metadata ``ember_segments`` lists per layer each
  segment's rows and scheme (a GGUF-derived model can mix int4 and int8 segments in one fused layer).
* ``config.json``: the source's Hugging Face config (or, for a GGUF source, ember's own model config
  under ``ember_model_config``) plus ``quantization_config`` = {"quant_method": "ember", "method":
  "rtn" | "gptq" | "awq" | "gguf", "scheme", "bits", "group_size", "lm_head", "lm_head_scheme",
  "format_version", "packing"}.
* tokenizer files: copied from a Hugging Face source, or converted from a GGUF's tokenizer.

Loading needs no calibration and no re-quantization: the packed tensors go straight into the layers,
so the reloaded model computes exactly what the saved one did.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ember.config import ModelConfig, RopeConfig
from ember.errors import CorruptModelError, InvalidRequestError
from ember.kernels.quant_linear import PackedInt4, PackedInt8
from ember.quant.methods import PackedWeight, QuantizedMethod, Segment
from ember.quant.scheme import QuantizedWeight, QuantScheme

FORMAT_VERSION = 1
PACKING = "quant_linear-tile16"  # the packed layout of ember.kernels.quant_linear at format version 1
_SEGMENTS_KEY = "ember_segments"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model",
)  # fmt: skip


def install_quantized(model: torch.nn.Module, weights: dict[str, QuantizedWeight]) -> None:
    """Put already-quantized weights (GPTQ/AWQ output) into a loaded model, by module name: e.g.
    ``model.layers.0.self_attn.qkv_proj`` (the fused [q; k; v] weight), ``lm_head``, or
    ``model.embed_tokens`` (a tied embedding, which then also serves the lookups)."""
    from ember.models.layers.linear import Linear

    modules = dict(model.named_modules())
    for name, weight in weights.items():
        module = modules.get(name)
        if not isinstance(module, Linear):
            raise InvalidRequestError(f"install_quantized: {name!r} is not a linear layer of this model")
        method = QuantizedMethod(weight.scheme)
        module.set_method(method)
        method.install(module, weight)


def save_quantized(model: torch.nn.Module, out_dir: str, tokenizer_source: str, method: str = "rtn") -> None:
    """Write `model` (quantized layers packed, the rest float) to `out_dir`.

    `tokenizer_source` is the model's original path: a Hugging Face folder (its config.json and
    tokenizer files are copied) or a GGUF file (its tokenizer is converted, ember's config saved).
    `method` names how the weights were quantized (recorded only).
    """
    from ember.models.base import _STACKED
    from ember.models.layers.linear import Linear

    os.makedirs(out_dir, exist_ok=True)
    unfused = {fused + str(shard): part for part, (fused, shard) in _STACKED.items()}
    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, list[dict[str, Any]]] = {}
    quantized = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        if isinstance(module.method, QuantizedMethod):
            layouts[name] = []
            for i, segment in enumerate(module.method.segments):
                layouts[name].append({"rows": segment.rows, "scheme": segment.scheme.name if segment.scheme else None})
                if segment.packed is not None:
                    for key, t in segment.packed.tensors().items():
                        tensors[f"{name}.weight.q{i}.{key}"] = t.contiguous()
                else:
                    tensors[f"{name}.weight.q{i}.float"] = segment.weight.contiguous()
            quantized[name] = module.method.segments
    for name, param in model.named_parameters():
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        shards = module.shard_sizes if isinstance(module, Linear) else [param.shape[0]]
        if len(shards) == 1:
            tensors[name] = param.data.contiguous()
            continue
        for shard, part in enumerate(param.data.split(shards)):  # back to the checkpoint's q/k/v names
            fused = next(f for f in (".qkv_proj.", ".gate_up_proj.") if f in name)
            tensors[name.replace(fused, unfused[fused + str(shard)])] = part.contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt", _SEGMENTS_KEY: json.dumps(layouts)})

    config = _source_config(model, tokenizer_source)
    config["quantization_config"] = _describe(model, quantized, method)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    _write_tokenizer(tokenizer_source, out_dir)


def iter_quantized_checkpoint(files: list[str]) -> tuple[Iterator[tuple[str, Any]], int]:
    """(name, float tensor | PackedWeight) of an ember quantized checkpoint, and how many there are."""
    entries: list[tuple[str, list[str], dict[str, Any] | None]] = []  # (path, names, layouts)
    total = 0
    for path in files:
        with _open(path) as f:
            layouts = json.loads((f.metadata() or {}).get(_SEGMENTS_KEY, "{}"))
            names = [n for n in f.keys() if not _is_segment_tensor(n, layouts)]
            entries.append((path, names, layouts))
            total += len(names) + len(layouts)

    def generate() -> Iterator[tuple[str, Any]]:
        for path, names, layouts in entries:
            with _open(path) as f:
                for name in names:
                    yield name, f.get_tensor(name)
                for module, layout in layouts.items():
                    yield f"{module}.weight", _read_packed(f, module, layout)

    return generate(), total


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `dataclasses.asdict(ModelConfig)` (the config of a GGUF-sourced checkpoint)."""
    data = dict(data)
    data["rope"] = RopeConfig(**data["rope"])
    if data.get("rope_local") is not None:
        data["rope_local"] = RopeConfig(**data["rope_local"])
    return ModelConfig(**data)


# -- helpers -------------------------------------------------------------------------------------


def _is_segment_tensor(name: str, layouts: dict[str, Any]) -> bool:
    module, sep, rest = name.partition(".weight.q")
    return bool(sep) and module in layouts


def _read_packed(f: Any, module: str, layout: list[dict[str, Any]]) -> PackedWeight:
    keys = set(f.keys())
    segments = []
    for i, seg in enumerate(layout):
        prefix = f"{module}.weight.q{i}."
        rows, scheme = int(seg["rows"]), seg["scheme"]
        try:
            if scheme is None:
                segments.append(Segment(rows, weight=f.get_tensor(prefix + "float")))
                continue
            parsed = QuantScheme.parse(scheme)
            cls = PackedInt4 if parsed.bits == 4 else PackedInt8
            tensors = {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
            segments.append(Segment(rows, packed=cls.from_tensors(tensors, rows), scheme=parsed))
        except KeyError as e:
            raise CorruptModelError(f"quantized checkpoint lacks tensor {e.args[0]} of {module}") from e
    return PackedWeight(segments)


def _describe(model: torch.nn.Module, quantized: dict[str, list[Segment]], method: str) -> dict[str, Any]:
    head_name = "lm_head" if getattr(model, "lm_head", None) is not None else "model.embed_tokens"
    schemes = {s.scheme for name, segs in quantized.items() if name != head_name for s in segs}
    head = {s.scheme for s in quantized.get(head_name, [])}
    body = next(iter(schemes)) if len(schemes) == 1 else None
    head_scheme = next(iter(head)) if len(head) == 1 else None
    return {
        "quant_method": "ember",
        "method": method,
        "format_version": FORMAT_VERSION,
        "packing": PACKING,
        "scheme": body.name if body else ("mixed" if schemes else None),
        "bits": body.bits if body else None,
        "group_size": body.group_size if body else None,
        "lm_head": bool(head),
        "lm_head_scheme": head_scheme.name if head_scheme else ("mixed" if head else None),
    }


def _source_config(model: torch.nn.Module, source: str) -> dict[str, Any]:
    if os.path.isdir(source):
        with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config.pop("quantization_config", None)
        return config
    cfg: ModelConfig = model.config
    return {"architectures": [cfg.architecture], "ember_model_config": dataclasses.asdict(cfg)}


def _write_tokenizer(source: str, out_dir: str) -> None:
    if os.path.isdir(source):
        for name in _TOKENIZER_FILES:
            path = os.path.join(source, name)
            if os.path.exists(path) and os.path.abspath(path) != os.path.abspath(os.path.join(out_dir, name)):
                shutil.copyfile(path, os.path.join(out_dir, name))
        return
    # A GGUF: write the tokenizer ember builds from it as tokenizer.json + the special-token names.
    from ember.loader.gguf_file import GGUFFile
    from ember.loader.gguf_tokenizer import build_gguf_tokenizer

    backend, info = build_gguf_tokenizer(GGUFFile(source))
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    names = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unk_token_id", "pad_token": "pad_token_id"}
    tok_config: dict[str, Any] = {k: backend.id_to_token(info[v]) for k, v in names.items() if info[v] is not None}
    if info["chat_template"]:
        tok_config["chat_template"] = info["chat_template"]
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": info["eos_token_ids"]}, f, indent=2)


def _open(path: str) -> Any:
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise CorruptModelError(f"{path}: not a valid safetensors file ({e})") from e
