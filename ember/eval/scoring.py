"""Full-sequence logits of one window, from ember's own model or from llama.cpp.

Both scorers take the same token ids (ember's tokenization), so their numbers differ only by the model
math. A scorer returns float32 logits for a range of rows, in chunks: a 262k vocabulary makes a window's
full logits ~0.5 GB, and only the scored rows are ever projected through the LM head.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from ember.config import EngineConfig
from ember.errors import InvalidRequestError, ModelNotFoundError
from ember.models.base import CausalLM
from ember.tokenizer import Tokenizer
from ember.worker.batch import ForwardBatch
from ember.worker.kv_cache import KVGroupSpec, PagedKVCache

# Rows of logits handled at once: bounds memory to ~128 MiB of float32 whatever the vocabulary.
_CHUNK_ELEMENTS = 1 << 25


def chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab_size)


class Scorer(Protocol):
    name: str
    vocab_size: int
    tokenizer: Tokenizer

    def logits(self, input_ids: Sequence[int], rows: range) -> Iterator[torch.Tensor]:
        """Float32 logits [n, vocab] of `rows` (positions of `input_ids`), in consecutive chunks."""
        ...


def uses_bos(tokenizer: Tokenizer) -> bool:
    """Whether the model expects a BOS in front of its input (its tokenizer adds one by default)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a")[:1] == [bos]


class EmberScorer:
    """ember's model, loaded exactly as `LLM(model)` loads it (same loader, dtype and quantized layers),
    run as one prefill per window through `ForwardBatch` with a private KV cache sized for one window."""

    def __init__(
        self, model: str | None, max_len: int, dtype: str = "auto", device: str = "cpu", **engine_args: Any
    ) -> None:
        """`engine_args`: further `EngineConfig` fields, e.g. quantization="none" to dequantize a GGUF."""
        from ember.engine.llm_engine import LLMEngine

        try:
            # The engine's own KV pool is made minimal: windows use the cache built below.
            config = EngineConfig(
                model=model, dtype=dtype, device=device, max_num_seqs=1, kv_cache_tokens=32,
                max_num_batched_tokens=max(max_len, 32), enable_prefix_caching=False, **engine_args,
            )
        except TypeError as e:
            raise InvalidRequestError(f"bad engine setting: {e}") from e
        engine = LLMEngine(config)
        if max_len > engine.max_model_len:
            raise InvalidRequestError(f"context {max_len} exceeds the model's limit of {engine.max_model_len} tokens")
        self.name = "ember"
        self.model: CausalLM = engine.runner.model
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size
        self.device = torch.device(device)
        spec = engine.runner.kv_cache
        block_size = spec.block_size
        blocks = -(-max_len // block_size)
        groups = [KVGroupSpec(g.name, g.window, g.layers, blocks + 1) for g in spec.groups]  # block 0: padding
        self.kv_cache = PagedKVCache(
            groups, block_size, engine.model_config.num_key_value_heads, engine.model_config.head_dim, engine.dtype, device,
            config.kv_cache_dtype,  # so KV-cache quantization shows in the scores
        )
        self._table = list(range(1, blocks + 1))
        self._max_len = max_len

    @torch.inference_mode()
    def hidden_states(self, input_ids: Sequence[int]) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] of one sequence (a single prefill from position 0)."""
        if len(input_ids) > self._max_len:
            raise InvalidRequestError(f"window of {len(input_ids)} tokens exceeds the scorer's {self._max_len}")
        ids = torch.tensor(list(input_ids), dtype=torch.long, device=self.device)
        batch = ForwardBatch(
            input_ids=ids,
            positions=torch.arange(len(ids), device=self.device),
            start_positions=[0],
            query_lens=[len(ids)],
            block_tables=[[self._table] for _ in self.kv_cache.groups],
            logits_indices=torch.empty(0, dtype=torch.long, device=self.device),
            kv_cache=self.kv_cache,
        )
        return self.model(batch.input_ids, batch.positions, batch)

    @torch.inference_mode()
    def logits(self, input_ids: Sequence[int], rows: range) -> Iterator[torch.Tensor]:
        hidden = self.hidden_states(input_ids)
        step = chunk_rows(self.vocab_size)
        for start in range(rows.start, rows.stop, step):
            yield self.model.compute_logits(hidden[start : min(start + step, rows.stop)]).float()


class LlamaCppScorer:
    """llama.cpp (llama-cpp-python) on a GGUF file, fed ember's token ids; one `eval` per window."""

    def __init__(self, model: str, max_len: int, threads: int = 2) -> None:
        if not model.endswith(".gguf"):
            raise InvalidRequestError("the llama.cpp engine reads only GGUF models (a .gguf file)")
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise ModelNotFoundError("the llama.cpp engine needs llama-cpp-python: pip install llama-cpp-python") from e
        self.name = "llama.cpp"
        self.tokenizer = Tokenizer.from_pretrained(model)
        # n_batch = n_ubatch = the window, so a window is one decode call.
        self._llm = Llama(
            model_path=model, logits_all=True, n_ctx=max_len, n_batch=max_len, n_ubatch=max_len,
            n_threads=threads, n_threads_batch=threads, verbose=False,
        )
        self.vocab_size = self._llm.n_vocab()

    def logits(self, input_ids: Sequence[int], rows: range) -> Iterator[torch.Tensor]:
        self._llm.reset()
        self._llm.eval(list(input_ids))
        scores = self._llm.scores  # [n_ctx, vocab] float32, rows past the input are stale
        step = chunk_rows(self.vocab_size)
        for start in range(rows.start, rows.stop, step):
            yield torch.from_numpy(scores[start : min(start + step, rows.stop)].copy())


def make_scorer(engine: str, model: str | None, max_len: int, dtype: str = "auto", **engine_args: Any) -> Scorer:
    """`engine_args` (EngineConfig fields) apply to ember only."""
    if engine == "ember":
        return EmberScorer(model, max_len, dtype, **engine_args)
    if engine in ("llama.cpp", "llamacpp"):
        if model is None:
            from ember.model_zoo import default_model_path

            model = default_model_path()
        return LlamaCppScorer(model, max_len)
    raise InvalidRequestError(f"unknown engine {engine!r}; choose ember or llama.cpp")
