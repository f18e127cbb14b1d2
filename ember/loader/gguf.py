"""GGUF checkpoints: metadata -> ModelConfig, tensors -> (HF name, float tensor) stream.

llama.cpp's converter changes a few things that ember undoes here, in one place: Llama-family Q/K rows
are permuted for its interleaved RoPE, and Gemma norm weights are stored as (1 + w).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from ember.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, RopeConfig
from ember.errors import CorruptModelError, UnsupportedModelError
from ember.loader.gguf_file import GGUFFile
from ember.loader.gguf_native import to_quantized_weight
from ember.loader.gguf_quants import dequantize
from ember.quant.scheme import QuantizedWeight

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}

_GEMMA3_SLIDING_PATTERN = 6  # every 6th layer is global (transformers' default for GGUF files)
_GEMMA3_LOCAL_ROPE_THETA = 10000.0

# GGUF per-block tensor name -> HF name (within model.layers.N.)
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: str) -> GGUFFile:
    """Open a GGUF file (metadata and tensor directory parsed, tensor data memory-mapped)."""
    return GGUFFile(path)


def field_value(gguf_file: GGUFFile, key: str, default: Any = None) -> Any:
    return gguf_file.get(key, default)


def model_config_from_gguf(gguf_file: GGUFFile) -> ModelConfig:
    arch = field_value(gguf_file, "general.architecture")
    if arch not in _ARCHITECTURES:
        supported = ", ".join(sorted(_ARCHITECTURES))
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (supported: {supported})")
    tensor_names = {t.name for t in gguf_file.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError("GGUF files with per-frequency RoPE factors (rope_freqs) are not supported yet")

    def meta(key: str, default: Any = None) -> Any:
        return field_value(gguf_file, f"{arch}.{key}", default)

    try:
        hidden = int(meta("embedding_length"))
        heads = int(meta("attention.head_count"))
        n_layers = int(meta("block_count"))
        ffn = int(meta("feed_forward_length"))
    except TypeError as e:
        raise CorruptModelError(f"GGUF metadata lacks required {arch} fields") from e
    kv_heads = int(meta("attention.head_count_kv", heads))
    head_dim = int(meta("attention.key_length", hidden // heads))
    tokens = field_value(gguf_file, "tokenizer.ggml.tokens")
    vocab = int(meta("vocab_size", len(tokens) if tokens else 0))
    is_gemma = arch == "gemma3"
    sliding_window = meta("attention.sliding_window") if is_gemma else None
    layer_types: list[str] = []
    if is_gemma:
        layer_types = [
            FULL_ATTENTION if (i + 1) % _GEMMA3_SLIDING_PATTERN == 0 else SLIDING_ATTENTION for i in range(n_layers)
        ]
    eos = field_value(gguf_file, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(meta("context_length", 4096)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        hidden_act="gelu_pytorch_tanh" if is_gemma else "silu",
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        attention_out_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        layer_types=layer_types,
        sliding_window=int(sliding_window) if sliding_window else None,
        rope=_rope_from_gguf(meta),
        rope_local=RopeConfig(theta=_GEMMA3_LOCAL_ROPE_THETA) if is_gemma else None,
        query_pre_attn_scalar=head_dim if is_gemma else None,
        gemma_norms=is_gemma,
        bos_token_id=field_value(gguf_file, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
        pad_token_id=field_value(gguf_file, "tokenizer.ggml.padding_token_id"),
    )


def _rope_from_gguf(meta: Any) -> RopeConfig:
    theta = float(meta("rope.freq_base", 10000.0))
    scaling = meta("rope.scaling.type", "none")
    if scaling in (None, "none"):
        return RopeConfig(theta=theta)
    if scaling == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(meta("rope.scaling.factor", 1.0)))
    raise UnsupportedModelError(f"GGUF RoPE scaling {scaling!r} is not supported")


def iter_gguf_tensors(
    gguf_file: GGUFFile, config: ModelConfig, keep_quantized: bool = True
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Yield (HF name, tensor), one tensor at a time (the file stays memory-mapped).

    With `keep_quantized`, 2-D quantized tensors come as exact `QuantizedWeight`s (the layers decide
    whether to keep or dequantize them); everything else as float32.
    """
    is_llama = config.architecture in ("LlamaForCausalLM", "MistralForCausalLM")
    for tensor in gguf_file.tensors:
        name = _hf_name(tensor.name, config.gemma_norms)
        if name is None:
            continue
        weights: torch.Tensor | QuantizedWeight | None = None
        if keep_quantized and len(tensor.shape) == 2:
            weights = to_quantized_weight(tensor.data, tensor.qtype, tensor.shape)
        if weights is None:
            weights = dequantize(tensor.data, tensor.qtype, tensor.shape)
        if config.gemma_norms and "norm" in tensor.name:
            weights = weights - 1.0
        if is_llama and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            heads = config.num_attention_heads if ".attn_q." in tensor.name else config.num_key_value_heads
            weights = _unpermute_rope_rows(weights, heads)
        yield name, weights


def _hf_name(gguf_name: str, gemma: bool) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    match = _BLOCK_RE.match(gguf_name)
    if match is None:
        return None
    layer, part, suffix = match.groups()
    if part == "ffn_norm":  # the norm before the MLP: Gemma has a post-attention norm besides it
        hf = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
    elif part in _BLOCK_NAMES:
        hf = _BLOCK_NAMES[part]
    else:
        return None
    return f"model.layers.{layer}.{hf}.{suffix}"


def _unpermute_rope_rows(weights: torch.Tensor | QuantizedWeight, heads: int) -> torch.Tensor | QuantizedWeight:
    """Undo llama.cpp's per-head row interleave of Q/K (it pairs rows (i, i + d/2) for its RoPE).
    Quantized blocks lie within a row, so a quantized weight's rows move with their scales."""
    if isinstance(weights, QuantizedWeight):
        move = lambda t: None if t is None else _unpermute_rope_rows(t, heads)  # noqa: E731
        return QuantizedWeight(weights.scheme, move(weights.codes), move(weights.scales), move(weights.offsets))
    rows = weights.shape[0]
    half = rows // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).transpose(1, 2).reshape(weights.shape)
