"""Model and engine configuration.

`ModelConfig` is ember's own, format-neutral description of a decoder-only transformer. It is built
either from a Hugging Face `config.json` (`ModelConfig.from_hf_dict`) or from GGUF metadata
(`ember.loader.gguf.model_config_from_gguf`); model code reads only this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.errors import InvalidRequestError, UnsupportedModelError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

_DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


@dataclass
class RopeConfig:
    """Rotary embedding parameters of one attention kind (HF `rope_parameters` entry)."""

    theta: float = 10000.0
    rope_type: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, default_theta: float) -> RopeConfig:
        params = dict(params or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"RoPE scaling type {rope_type!r} is not supported")
        return cls(
            theta=float(params.get("rope_theta", default_theta)),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass
class ModelConfig:
    """Everything the model math needs; field names follow Hugging Face's configs."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    attention_out_bias: bool = False  # bias on the output projection (Llama's attention_bias; not Qwen2)
    qk_norm: bool = False
    # Per-layer attention kind; sliding layers see only the last `sliding_window` positions.
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_local: RopeConfig | None = None  # sliding layers' RoPE when it differs (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Gemma family: embeddings scaled by sqrt(hidden), RMSNorm weight used as (1 + w), pre/post norms.
    gemma_norms: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = [FULL_ATTENTION] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise UnsupportedModelError("config: layer_types must have one entry per layer")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING_ATTENTION and self.sliding_window is not None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json (transformers 4.x or 5.x layout)."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise UnsupportedModelError("config.json names no architecture ('architectures' is missing)")
        arch = archs[0]
        model_type = cfg.get("model_type", "")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            n_layers = int(cfg["num_hidden_layers"])
            inter = int(cfg["intermediate_size"])
            vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise UnsupportedModelError(f"config.json lacks required field {e.args[0]!r}") from e
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        is_gemma = model_type.startswith("gemma")
        rope, rope_local = _rope_from_hf(cfg)
        layer_types = list(cfg.get("layer_types") or [])
        sliding_window = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding_window = None  # Qwen configs carry a window size that is switched off
        if sliding_window is not None and not layer_types:
            layer_types = [SLIDING_ATTENTION] * n_layers  # Mistral: every layer windowed
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            attention_out_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
            qk_norm=model_type in ("qwen3", "gemma3_text", "gemma3"),
            layer_types=layer_types,
            sliding_window=int(sliding_window) if sliding_window else None,
            rope=rope,
            rope_local=rope_local,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            gemma_norms=is_gemma,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            pad_token_id=cfg.get("pad_token_id"),
        )


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[RopeConfig, RopeConfig | None]:
    """Read RoPE settings from either transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    theta = float(cfg.get("rope_theta", 10000.0))
    params = cfg.get("rope_parameters")
    if params and FULL_ATTENTION in params:  # per-attention-kind (Gemma 3 in transformers 5)
        rope = RopeConfig.from_hf(params[FULL_ATTENTION], theta)
        local = params.get(SLIDING_ATTENTION)
        return rope, RopeConfig.from_hf(local, 10000.0) if local else None
    if params:
        return RopeConfig.from_hf(params, theta), None
    rope = RopeConfig.from_hf(cfg.get("rope_scaling"), theta)
    local_theta = cfg.get("rope_local_base_freq")
    return rope, RopeConfig(theta=float(local_theta)) if local_theta else None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'auto' (or None) means bfloat16: ember's default compute dtype, also on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = (dtype or "auto").lower()
    if key not in _DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[key] or torch.bfloat16


@dataclass
class EngineConfig:
    """Settings of one engine instance (the CLI's flags are generated from these fields)."""

    model: str | None = None
    """Path of a GGUF file or a Hugging Face folder; None means the default model (Gemma 3 270M Q4_K_M)."""
    dtype: str = "auto"
    """Compute dtype: auto (= bfloat16), bfloat16, float16 or float32."""
    quantization: str = "auto"
    """Weight quantization. auto: quantized GGUF weights (Q4_K, Q5_0, Q6_K, Q8_0) run as stored (exact
    int4/int8), ember quantized checkpoints load as saved, float weights stay float; none: dequantize
    everything to --dtype; or a scheme to quantize every linear layer on load (round-to-nearest): int8
    (per channel), int4 (groups of 32), or with a group size/option, e.g. int4-g128, int8-g32, int4-pc."""
    lm_head_quantization: str = "auto"
    """LM head quantization (with tied embeddings: the embedding table): auto (follow --quantization),
    none (keep it float, the most accuracy-sensitive layer), or a scheme such as int8."""
    device: str = "cpu"
    """Torch device to run on."""
    max_model_len: int | None = None
    """Longest context (prompt + output) in tokens; defaults to the model's own limit, capped at 8192."""
    max_num_seqs: int = 64
    """Most sequences decoded together in one step."""
    max_num_batched_tokens: int = 2048
    """Most tokens (prompt chunks) computed in one step."""
    kv_cache_memory: float = 4.0
    """GiB reserved for the KV cache (committed only as blocks are first used)."""
    kv_cache_tokens: int | None = None
    """Size the full-attention KV pool by tokens instead of by memory (e.g. a deliberately small pool)."""
    kv_cache_dtype: str = "auto"
    """KV cache storage: auto (= the compute dtype), int8 or fp8_e4m3 (1 byte per value plus a float32
    scale per token and head: ~2x the tokens in the same kv_cache_memory, at a small accuracy cost)."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a prompt prefix computed before."""
    speculative_config: str | dict[str, Any] | None = None
    """Speculative decoding, as JSON (vLLM's names), e.g. {"method": "ngram", "num_speculative_tokens": 4},
    {"method": "draft_model", "model": "draft.gguf"} or {"method": "layer_skip", "skip_layers_file": "f.json"}
    (see ember.spec.config.SpeculativeConfig); off by default."""
    structured_jump_forward: bool = False
    """Structured output: propose the text a grammar forces next (e.g. a JSON key) as draft tokens, verified
    in the same step like speculative drafts. Off by default: it is exact in float32, but on quantized
    weights a multi-token verification rounds differently from one-token steps, so greedy outputs can change
    (BENCHMARKS.md: 1-24% faster constrained decoding on the GGUFs)."""
    seed: int = 0
    """Seed for requests that set none."""
    batch_invariant: bool = True
    """A request's logits are bitwise identical whatever else is in its batch and however its prompt is
    chunked (bf16, GGUF, int4/int8 weights, quantized KV; not float32/float16 weights, which use oneDNN).
    False lets bf16 float weights use oneDNN's GEMM from 9 rows on: up to ~1.6x faster matmuls at large
    batches, results that depend on the batch."""
