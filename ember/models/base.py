"""The decoder-only skeleton every family shares: embedding, a stack of layers, final norm, LM head,
and weight loading by Hugging Face parameter names. A family supplies only its decoder layer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ember.config import ModelConfig
from ember.errors import CorruptModelError
from ember.models.layers.linear import Linear, VocabEmbedding
from ember.quant.methods import PackedWeight
from ember.models.layers.norm import RMSNorm
from ember.models.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from ember.worker.batch import ForwardBatch

# Checkpoint tensors that are stored separately but live stacked in one fused parameter.
_STACKED = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class CausalLM(nn.Module):
    """Subclasses implement `make_layer(config, layer_idx)`; a layer's forward is
    `(hidden, cos, sin, batch) -> hidden`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.dtype = torch.get_default_dtype()  # compute dtype (weights may be quantized)
        # A Linear-like module, so that a tied embedding can be quantized as the LM head it also is.
        self.model.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(self.make_layer(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=config.gemma_norms)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope)
        self.rotary_local = RotaryEmbedding(config.head_dim, config.rope_local) if config.rope_local else None
        # Gemma scales embeddings by sqrt(hidden), rounded to the weight dtype as the reference does.
        self.embed_scale = config.hidden_size**0.5 if config.gemma_norms else None

    def make_layer(self, config: ModelConfig, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids, positions: [T] (all sequences' tokens flattened) -> hidden states [T, hidden]."""
        hidden = self.model.embed_tokens(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        cos, sin = self.rotary(positions, hidden.dtype)
        local = self.rotary_local(positions, hidden.dtype) if self.rotary_local is not None else (cos, sin)
        for i, layer in enumerate(self.model.layers):
            if i in batch.skip_layers:
                continue
            layer_cos, layer_sin = local if self.config.is_sliding(i) else (cos, sin)
            hidden = layer(hidden, layer_cos, layer_sin, batch)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        if self.lm_head is None:
            logits = self.model.embed_tokens.logits(hidden, out_dtype=torch.float32)
        else:
            logits = self.lm_head(hidden, out_dtype=torch.float32)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into parameters; every parameter (and shard) must be covered."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        # Quantized layers hold no float `weight` parameter; their weight is still expected.
        params.update({f"{name}.weight": None for name, m in modules.items() if isinstance(m, Linear)})
        expected = {(name, shard) for name in params for shard in range(_num_shards(modules, name))}
        for name, tensor in weights:
            if self.lm_head is None and name.startswith("lm_head."):
                continue  # tied: the embedding is the head
            target, shard = _stacked_target(name)
            if target not in params:
                continue  # e.g. rotary caches that some exporters save
            module_name, _, param_name = target.rpartition(".")
            module = modules[module_name]
            if isinstance(module, Linear):
                module.load_shard(param_name, tensor, shard)
            else:
                if not isinstance(tensor, torch.Tensor):  # a quantized value for a float parameter
                    tensor = tensor.dequantize()
                _copy_checked(target, params[target], tensor)
            if isinstance(tensor, PackedWeight):  # a whole fused layer (ember checkpoint): every shard
                expected.difference_update((target, s) for s in range(_num_shards(modules, target)))
            expected.discard((target, shard))
        if expected:
            names = sorted({name for name, _ in expected})
            raise CorruptModelError(f"checkpoint lacks tensors for: {', '.join(names[:5])}")
        for module in self.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()


def _stacked_target(name: str) -> tuple[str, int]:
    for part, (fused, shard) in _STACKED.items():
        if part in name:
            return name.replace(part, fused), shard
    return name, 0


def _num_shards(modules: dict[str, nn.Module], param: str) -> int:
    module = modules[param.rpartition(".")[0]]
    return len(module.shard_sizes) if isinstance(module, Linear) else 1


def _copy_checked(name: str, param: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise CorruptModelError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(tensor)
