"""LLMEngine: add / abort requests and advance them all one step at a time."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import NamedTuple

from ember.config import EngineConfig, ModelConfig, resolve_dtype
from ember.engine.beam_search import BeamSearch
from ember.engine.block_manager import KVCacheManager
from ember.engine.output_processor import OutputProcessor
from ember.engine.request import FinishReason, Request
from ember.engine.scheduler import Scheduler
from ember.engine.sequence_group import SequenceGroup
from ember.errors import InvalidRequestError
from ember.loader.model_loader import load_model, resolve_model
from ember.model_zoo import default_model_path
from ember.models.layers.linear import Linear
from ember.outputs import CompletionOutput, RequestOutput, StepSearchState
from ember.quant.config import QuantConfig
from ember.sampling_params import BeamSearchParams, SamplingParams, StepBoundary
from ember.spec.build import check_skip_layers, draft_kv_cache, draft_model_source, make_proposer
from ember.spec.config import SpeculativeConfig
from ember.structured.backend import StructuredOutputBackend
from ember.structured.processor import GrammarProcessor
from ember.tokenizer import IncrementalDetokenizer, Tokenizer
from ember.worker.kv_cache import KVGroupSpec, PagedKVCache, bytes_per_block, kv_quant_scheme
from ember.worker.logits_processors import default_processors
from ember.worker.model_runner import ModelRunner

logger = logging.getLogger("ember")

_DEFAULT_MAX_MODEL_LEN = 8192


class TokenizedPrompt(NamedTuple):
    text: str | None
    token_ids: list[int]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        path = config.model or default_model_path()
        source = resolve_model(path)
        self.model_config = source.config
        self.dtype = resolve_dtype(config.dtype)
        quant = QuantConfig.from_settings(config.quantization, config.lm_head_quantization)  # fails before loading
        kv_quant_scheme(config.kv_cache_dtype)  # a bad value fails here, before the model loads
        self.speculative_config = SpeculativeConfig.parse(config.speculative_config)
        # A GGUF's tokenizer comes from the file resolve_model already parsed.
        self.tokenizer = (
            Tokenizer.from_gguf(source.gguf_file) if source.gguf_file is not None else Tokenizer.from_pretrained(path)
        )
        self.eos_token_ids = list(dict.fromkeys(self.model_config.eos_token_ids + self.tokenizer.eos_token_ids))
        self.max_model_len = self._max_model_len()
        speculative = self.speculative_config
        method = speculative.method if speculative else None
        # Speculation's own checks (draft path and vocabulary, skip set) come before any weights load.
        draft_source = None
        if method == "draft_model":
            draft_source = draft_model_source(speculative, self.model_config, self.tokenizer, self.max_model_len)
        skip_layers = check_skip_layers(speculative, self.model_config) if method == "layer_skip" else frozenset()
        model = load_model(source, self.dtype, config.device, quant)
        draft = load_model(draft_source, self.dtype, config.device, quant) if draft_source else None
        if not config.batch_invariant:
            for module in (m for loaded in (model, draft) if loaded is not None for m in loaded.modules()):
                if isinstance(module, Linear):
                    module.batch_invariant = False
        kv_cache = self._allocate_kv_cache(draft.config if draft else None)
        draft_cache = draft_kv_cache(draft.config, kv_cache, self.dtype, config.device) if draft else None
        self.kv_manager = KVCacheManager(
            [(spec.num_blocks, spec.window) for spec in kv_cache.groups], config.block_size, config.enable_prefix_caching
        )
        proposer = make_proposer(speculative, model, kv_cache, draft, draft_cache, skip_layers)
        # xgrammar loads only when the first constrained request comes.
        self.structured = StructuredOutputBackend(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        processors = default_processors() + [GrammarProcessor(self.structured, config.structured_jump_forward)]
        self.runner = ModelRunner(model, kv_cache, config.device, proposer, processors)
        self.scheduler = Scheduler(
            self.kv_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            num_lookahead_tokens=proposer.num_lookahead_tokens if proposer else 0,
            disable_by_batch_size=speculative.disable_by_batch_size if speculative else None,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._rng = random.Random(config.seed)
        groups = ", ".join(f"{g.name}: {len(g.layers)} layers x {g.num_blocks} blocks" for g in kv_cache.groups)
        logger.info(
            "ember: %s (%s, %s) on %s; context %d tokens; KV cache holds %d tokens as %s (%s, block size %d)",
            path, self.model_config.architecture, self.dtype, config.device, self.max_model_len,
            self.kv_manager.capacity_tokens, kv_cache.keys[0].dtype, groups, config.block_size,
        )

    # -- public API -------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int] | TokenizedPrompt,
        params: SamplingParams | BeamSearchParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a prompt (text, token ids, or already processed). Raises InvalidRequestError before
        changing any state. `arrival_time` (time.monotonic) defaults to now; a server passes when the
        HTTP request came in, so queue time and TTFT include its wait before reaching the engine.
        With BeamSearchParams the request is a beam search; its one output, when finished, holds the
        beam_width best hypotheses, best first."""
        params = params or SamplingParams()
        text, token_ids = prompt if isinstance(prompt, TokenizedPrompt) else self.process_prompt(prompt)
        if request_id in self.output_processor.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if isinstance(params, BeamSearchParams):
            self._add_beam_search(request_id, TokenizedPrompt(text, token_ids), params, arrival_time)
            return
        self._check_token_ids(params)
        if params.structured_outputs is not None:  # compiled (or found in the cache) before anything is queued
            self.structured.compile(params.structured_outputs)
        limit = self._check_length(len(token_ids), params.max_tokens)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        children = []
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else self._rng.getrandbits(63)
            sequence_id = request_id if params.n == 1 else f"{index}_{request_id}"
            children.append(self._sequence(sequence_id, request_id, TokenizedPrompt(text, token_ids), params, limit,
                                           seed, arrival, index=index))  # fmt: skip
        self.output_processor.add(request_id, children)
        # Siblings fork off the first one once its prompt is computed, sharing its KV blocks.
        children[0].pending_forks = children[1:]
        self.scheduler.add(children[0])

    def _add_beam_search(
        self, request_id: str, prompt: TokenizedPrompt, beam: BeamSearchParams, arrival_time: float | None
    ) -> None:
        """One sequence to start with; its group forks and prunes the beams (sequence_group.py)."""
        if self.speculative_config is not None:
            raise InvalidRequestError("beam search does not run with speculative decoding (speculative_config)")
        limit = self._check_length(len(prompt.token_ids), beam.max_tokens)
        # The group decides every token: the sequence itself never stops on EOS or samples.
        params = SamplingParams(temperature=beam.temperature, max_tokens=beam.max_tokens, ignore_eos=True)
        group = SequenceGroup(request_id, BeamSearch(beam, self.eos_token_ids))
        first = Request(
            request_id=request_id, prompt=prompt.text, prompt_token_ids=prompt.token_ids, params=params,
            max_total_len=limit, seed=0, eos_token_ids=self.eos_token_ids, parent_id=request_id,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(), group=group,
        )  # fmt: skip
        group.add_member(first)
        self.output_processor.add_group(request_id, group, first)
        self.scheduler.add(first)

    def add_step_search(
        self, request_id: str, prompt: str | Sequence[int] | TokenizedPrompt, params: SamplingParams,
        num_sequences: int, boundary: StepBoundary, arrival_time: float | None = None,
    ) -> None:  # fmt: skip
        """Queue a step search (particle filtering, step-wise beam or best-first search): `num_sequences`
        samples of the prompt that share its KV blocks and stop at the end of each step (`boundary`) until
        `advance_step_search` says which go on, how many times forked; `step_search_state` shows them. It
        yields no RequestOutputs: the caller reads its state and releases it with `abort_request`."""
        text, token_ids = prompt if isinstance(prompt, TokenizedPrompt) else self.process_prompt(prompt)
        if request_id in self.output_processor.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if self.speculative_config is not None:
            raise InvalidRequestError("a step search does not run with speculative decoding (speculative_config)")
        if not isinstance(num_sequences, int) or isinstance(num_sequences, bool) or num_sequences < 1:
            raise InvalidRequestError(f"num_sequences must be a positive integer, got {num_sequences!r}")
        if params.n != 1:
            raise InvalidRequestError("a step search sets its own number of sequences; leave SamplingParams.n at 1")
        if params.structured_outputs is not None:
            raise InvalidRequestError("a step search does not take structured_outputs")
        self._check_token_ids(params)
        limit = self._check_length(len(token_ids), params.max_tokens)
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        group = SequenceGroup(request_id, boundary=boundary, seed=base_seed)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        members = []
        for index in range(num_sequences):
            member = self._sequence(group.child_id(), request_id, TokenizedPrompt(text, token_ids), params, limit,
                                    base_seed + index, arrival, group=group)  # fmt: skip
            group.add_member(member)
            members.append(member)
        self.output_processor.add_group(request_id, group, members[0])
        members[0].pending_forks = members[1:]  # they fork off the first once the prompt is computed
        self.scheduler.add(members[0])

    def _sequence(
        self, sequence_id: str, request_id: str, prompt: TokenizedPrompt, params: SamplingParams, limit: int,
        seed: int, arrival_time: float, index: int = 0, group: SequenceGroup | None = None,
    ) -> Request:  # fmt: skip
        """One sampled sequence of a user request, with its detokenizer (and logprobs, if asked for)."""
        sequence = Request(
            request_id=sequence_id, prompt=prompt.text, prompt_token_ids=prompt.token_ids, params=params,
            max_total_len=limit, seed=seed, eos_token_ids=self.eos_token_ids, parent_id=request_id, index=index,
            arrival_time=arrival_time, group=group,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt.token_ids, params.skip_special_tokens),
        )  # fmt: skip
        if params.logprobs is not None:
            sequence.logprobs, sequence.cumulative_logprob = [], 0.0
        return sequence

    def step_search_ready(self, request_id: str) -> bool:
        """Every live sequence of the step search has ended its step (cheap: no snapshot is built)."""
        return self._step_group(request_id).ready()

    def step_search_state(self, request_id: str) -> StepSearchState:
        group = self._step_group(request_id)
        return StepSearchState(
            ready=group.ready(),
            parked={m.request_id: _partial(m) for m in group.members if m.request_id in group.parked},
            running=[m.request_id for m in group.members if m.request_id not in group.parked],
            ended={m.request_id: _partial(m) for m in group.ended},
        )

    def advance_step_search(self, request_id: str, counts: dict[str, int]) -> dict[str, list[str]]:
        """Per parked sequence id, how many continuations its next step has (0 prunes it; k forks it k - 1
        times); sequences not named stay parked. Returns, per named sequence, the ids going on (itself
        first, then its forks)."""
        return self.scheduler.advance_step_group(self._step_group(request_id), counts)

    def _step_group(self, request_id: str) -> SequenceGroup:
        group = self.output_processor.groups.get(request_id)
        if group is None or group.boundary is None:
            raise InvalidRequestError(f"no step search with request id {request_id!r}")
        return group

    def _check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        """The request's last position (prompt + max_tokens, or the context limit), checked to fit."""
        limit = self.max_model_len if max_tokens is None else prompt_len + max_tokens
        if limit > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context limit "
                f"(max_model_len) of {self.max_model_len} tokens; lower max_tokens"
            )
        if not self.kv_manager.can_ever_fit(limit, self.config.max_num_batched_tokens):
            raise InvalidRequestError(
                f"request needs up to {limit} tokens of KV cache, but the cache holds only "
                f"{self.kv_manager.capacity_tokens}; lower max_tokens or raise kv_cache_memory"
            )
        return limit

    def process_prompt(self, prompt: str | Sequence[int]) -> TokenizedPrompt:
        """Tokenize and check a prompt against the vocabulary and the context limit."""
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
            vocab = self.model_config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in token_ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt is {len(token_ids)} tokens long, but the context limit (max_model_len) is "
                f"{self.max_model_len} tokens, including at least one generated token"
            )
        return TokenizedPrompt(text, token_ids)

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or {}))):
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise InvalidRequestError(f"{name}: token id {outside[0]} is outside the vocabulary [0, {vocab})")

    def abort_request(self, request_id: str) -> None:
        for child in self.output_processor.pop(request_id):
            self.scheduler.finish(child, FinishReason.ABORT)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one model step; return an output for every user request that advanced."""
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty():
            return []
        result = self.runner.execute(scheduled)
        updates = self.scheduler.update_from_output(scheduled, result)
        return self.output_processor.process(updates)

    # -- internals --------------------------------------------------------------------------------

    def _max_model_len(self) -> int:
        model_limit = self.model_config.max_position_embeddings
        wanted = self.config.max_model_len or min(model_limit, _DEFAULT_MAX_MODEL_LEN)
        if wanted > model_limit:
            raise InvalidRequestError(f"max_model_len {wanted} exceeds the model's context of {model_limit} tokens")
        return wanted

    def _allocate_kv_cache(self, draft: ModelConfig | None = None) -> PagedKVCache:
        """Split the KV budget: sliding-window layers get just enough blocks for every sequence's window
        plus one prompt chunk; full-attention layers get the rest (shared with a draft model's cache,
        which has as many blocks)."""
        cfg, config = self.model_config, self.config
        block_size = config.block_size
        full = tuple(i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i))
        sliding = tuple(i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i))

        def block_bytes(layers: tuple[int, ...]) -> int:
            return bytes_per_block(
                block_size, len(layers), cfg.num_key_value_heads, cfg.head_dim, self.dtype, config.kv_cache_dtype
            )

        budget = int(config.kv_cache_memory * (1 << 30))
        groups: list[KVGroupSpec] = []
        if sliding and full:
            window = cfg.sliding_window or 0
            per_seq = -(-window // block_size) + 1
            count = config.max_num_seqs * per_seq + -(-config.max_num_batched_tokens // block_size) + 1
            groups.append(KVGroupSpec("sliding", window, sliding, count + 1))
            budget -= (count + 1) * block_bytes(sliding)
        layers = full or sliding
        draft_bytes = 0
        if draft is not None:
            draft_bytes = bytes_per_block(
                block_size, draft.num_hidden_layers, draft.num_key_value_heads, draft.head_dim, self.dtype,
                config.kv_cache_dtype,
            )
        if config.kv_cache_tokens is not None:
            count = -(-config.kv_cache_tokens // block_size)
        else:
            count = budget // (block_bytes(layers) + draft_bytes) - 1
        if count < 2:
            raise InvalidRequestError(
                f"kv_cache_memory of {config.kv_cache_memory} GiB is too small for this model; raise it"
            )
        window = None if full else cfg.sliding_window
        groups.insert(0, KVGroupSpec("full" if full else "sliding", window, layers, count + 1))
        return PagedKVCache(
            groups, block_size, cfg.num_key_value_heads, cfg.head_dim, self.dtype, config.device, config.kv_cache_dtype
        )


def _partial(request: Request) -> CompletionOutput:
    """A step-search sequence as it stands."""
    return CompletionOutput(
        index=0, text=request.output_text, token_ids=list(request.output_token_ids),
        cumulative_logprob=request.cumulative_logprob, logprobs=list(request.logprobs) if request.logprobs else None,
        finish_reason=request.finish_reason.value if request.finish_reason else None, stop_reason=request.stop_reason,
    )  # fmt: skip
