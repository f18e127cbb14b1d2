"""Test helpers that run an ember model directly (no engine) on a batch of prompts."""

from __future__ import annotations

import torch

from ember.models.base import CausalLM
from ember.worker.batch import ForwardBatch
from ember.worker.kv_cache import KVGroupSpec, PagedKVCache

BLOCK_SIZE = 16


def batch_logits(model: CausalLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """One flattened forward over all prompts (own blocks each, one layer group); logits at every position."""
    cfg = model.config
    dtype = model.dtype
    blocks_per_prompt = [-(-len(p) // BLOCK_SIZE) for p in prompts]
    group = KVGroupSpec("all", None, tuple(range(cfg.num_hidden_layers)), sum(blocks_per_prompt) + 1)
    kv = PagedKVCache([group], BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim, dtype, "cpu")
    tables, next_block = [], 1
    for count in blocks_per_prompt:
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    ids = [t for p in prompts for t in p]
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor([i for p in prompts for i in range(len(p))]),
        start_positions=[0] * len(prompts),
        query_lens=[len(p) for p in prompts],
        block_tables=[tables],
        logits_indices=torch.arange(len(ids)),
        kv_cache=kv,
    )
    with torch.inference_mode():
        logits = model.compute_logits(model(batch.input_ids, batch.positions, batch))
    return list(logits.split([len(p) for p in prompts]))


def assert_no_leak(engine) -> None:  # noqa: ANN001 - an LLMEngine
    """Every KV block is back in the pool and no request is left anywhere."""
    assert not engine.has_unfinished_requests()
    assert not engine.output_processor.requests and not engine.scheduler.requests
    # The runner drops finished requests' state at its next step, when the scheduler tells it.
    assert set(engine.runner.input_batch.states) <= set(engine.scheduler._dropped)  # noqa: SLF001
    draft_states = getattr(engine.runner.proposer, "_computed", {})  # a draft model's per-request progress
    assert set(draft_states) <= set(engine.scheduler._dropped)  # noqa: SLF001
    for manager in engine.kv_manager.managers:
        assert not manager.tables
        assert manager.num_free_blocks == manager.num_blocks
        assert all(block.ref_count == 0 for block in manager.blocks)
