"""Setting up speculative decoding's proposer, with the checks that must pass before any model loads: a
draft model's path and vocabulary, a layer-skip set's indices."""

from __future__ import annotations

import torch

from ember.config import ModelConfig
from ember.errors import InvalidRequestError
from ember.loader.model_loader import ModelSource, resolve_model
from ember.models.base import CausalLM
from ember.spec.config import SpeculativeConfig
from ember.spec.model_drafter import ModelDrafter
from ember.spec.ngram import NgramProposer
from ember.spec.proposer import Proposer
from ember.tokenizer import Tokenizer
from ember.worker.kv_cache import KVGroupSpec, PagedKVCache


def draft_model_source(
    config: SpeculativeConfig, target: ModelConfig, tokenizer: Tokenizer, max_model_len: int
) -> ModelSource:
    """Resolve the draft and refuse one whose vocabulary differs from the target's (its token ids would
    mean other text) or whose context is shorter."""
    if all(target.is_sliding(i) for i in range(target.num_hidden_layers)):
        raise InvalidRequestError("speculative method draft_model needs a target with full-attention layers")
    source = resolve_model(config.model or "")
    if source.config.max_position_embeddings < max_model_len:
        raise InvalidRequestError(
            f"speculative_config.model {config.model!r} handles {source.config.max_position_embeddings} positions, "
            f"fewer than max_model_len ({max_model_len}); lower max_model_len"
        )
    gguf = source.gguf_file
    draft_tokenizer = Tokenizer.from_gguf(gguf) if gguf is not None else Tokenizer.from_pretrained(source.path)
    if draft_tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise InvalidRequestError(
            f"speculative_config.model {config.model!r} has a different vocabulary from the target "
            f"({draft_tokenizer.vocab_size} vs {tokenizer.vocab_size} tokens, or the same ids mean other tokens); "
            "a draft model must share the target's tokenizer"
        )
    return source


def check_skip_layers(config: SpeculativeConfig, target: ModelConfig) -> frozenset[int]:
    skip = config.layers_to_skip()
    layers = target.num_hidden_layers
    if max(skip) >= layers:
        raise InvalidRequestError(f"speculative_config: skip layer {max(skip)} is past the model's {layers} layers")
    if len(skip) >= layers:
        raise InvalidRequestError("speculative_config: skip_layers would skip every layer")
    return skip


def draft_kv_cache(draft: ModelConfig, target_cache: PagedKVCache, dtype: torch.dtype, device: str) -> PagedKVCache:
    """The draft's paged cache: one pool for all its layers, as many blocks as the target's full-attention
    pool, so it runs on the target's block tables."""
    full = target_cache.groups[0]
    assert full.window is None, "draft_model_source refuses targets without full-attention layers"
    spec = KVGroupSpec("draft", None, tuple(range(draft.num_hidden_layers)), full.num_blocks)
    heads, head_dim = draft.num_key_value_heads, draft.head_dim
    return PagedKVCache([spec], target_cache.block_size, heads, head_dim, dtype, device, target_cache.kv_cache_dtype)


def make_proposer(
    config: SpeculativeConfig | None,
    target: CausalLM,
    kv_cache: PagedKVCache,
    draft: CausalLM | None = None,
    draft_cache: PagedKVCache | None = None,
    skip_layers: frozenset[int] = frozenset(),
) -> Proposer | None:
    if config is None:
        return None
    if config.method == "ngram":
        return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
    k, p_min, vocab = config.num_speculative_tokens, config.draft_p_min, target.config.vocab_size
    if config.method == "draft_model":
        assert draft is not None and draft_cache is not None
        return ModelDrafter(draft, draft_cache, k, p_min, vocab, own_cache=True)
    return ModelDrafter(target, kv_cache, k, p_min, vocab, own_cache=False, skip_layers=skip_layers)
