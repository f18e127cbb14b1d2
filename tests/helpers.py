"""Test helpers that run an ember model directly (no engine) on a batch of prompts."""

from __future__ import annotations

import torch

from ember.models.base import CausalLM
from ember.worker.batch import ForwardBatch
from ember.worker.kv_cache import ContiguousKVCache


def batch_logits(model: CausalLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """One flattened forward over all prompts (each in its own KV slot); logits at every position."""
    cfg = model.config
    dtype = model.model.embed_tokens.weight.dtype
    max_len = max(len(p) for p in prompts)
    kv = ContiguousKVCache(cfg.num_hidden_layers, len(prompts), max_len, cfg.num_key_value_heads, cfg.head_dim, dtype, "cpu")
    ids = [t for p in prompts for t in p]
    positions = [i for p in prompts for i in range(len(p))]
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(positions),
        slots=list(range(len(prompts))),
        start_positions=[0] * len(prompts),
        query_lens=[len(p) for p in prompts],
        logits_indices=torch.arange(len(ids)),
        kv_cache=kv,
    )
    with torch.inference_mode():
        logits = model.compute_logits(model(batch.input_ids, batch.positions, batch))
    return list(logits.split([len(p) for p in prompts]))
