"""Embeddings for /v1/embeddings: the mean of the model's final hidden states over a prompt, L2-normalized.

Pooling is stated because it decides what the vectors mean: mean pooling over every prompt token of the
final-norm hidden states (the LM head's input), in float32, scaled to length 1 so a dot product is the
cosine similarity (as OpenAI's embeddings are).

The forward uses the engine's model with a KV cache of its own, sized for the batch, so no engine
request's blocks are touched; call it on the step loop's thread (`AsyncLLM.run_in_step_loop`), between two
steps, so it never competes with one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ember.engine.llm_engine import LLMEngine
from ember.worker.batch import ForwardBatch


def batches(prompts: list[list[int]], max_tokens: int) -> Iterator[list[list[int]]]:
    """Consecutive prompts in groups of at most `max_tokens` tokens (a longer prompt goes alone), so one
    forward is never larger than a step the engine is configured for."""
    group: list[list[int]] = []
    tokens = 0
    for prompt in prompts:
        if group and tokens + len(prompt) > max_tokens:
            yield group
            group, tokens = [], 0
        group.append(prompt)
        tokens += len(prompt)
    if group:
        yield group


@torch.inference_mode()
def mean_pooled(engine: LLMEngine, prompts: list[list[int]]) -> list[list[float]]:
    """One forward over `prompts` (token ids, each from position 0) -> one unit vector per prompt."""
    cache, tables = engine.runner.kv_cache.scratch_for([len(p) for p in prompts])
    flat = [token for p in prompts for token in p]
    device = engine.config.device
    batch = ForwardBatch(
        input_ids=torch.tensor(flat, dtype=torch.long, device=device),
        positions=torch.tensor([i for p in prompts for i in range(len(p))], dtype=torch.long, device=device),
        start_positions=[0] * len(prompts),
        query_lens=[len(p) for p in prompts],
        block_tables=[tables for _ in cache.groups],  # sliding layers mask by position themselves
        logits_indices=torch.empty(0, dtype=torch.long, device=device),
        kv_cache=cache,
    )
    hidden = engine.runner.model(batch.input_ids, batch.positions, batch)
    pooled = torch.stack([rows.float().mean(0) for rows in hidden.split(batch.query_lens)])
    return F.normalize(pooled, dim=-1).tolist()

