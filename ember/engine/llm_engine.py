"""LLMEngine: add / abort requests and advance them all one step at a time."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ember.config import EngineConfig, resolve_dtype
from ember.engine.block_manager import KVCacheManager
from ember.engine.request import FinishReason, Request
from ember.engine.scheduler import Scheduler
from ember.errors import InvalidRequestError
from ember.loader.model_loader import load_model, resolve_model
from ember.model_zoo import default_model_path
from ember.quant.config import QuantConfig
from ember.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from ember.sampling_params import SamplingParams
from ember.tokenizer import IncrementalDetokenizer, Tokenizer
from ember.worker.kv_cache import KVGroupSpec, PagedKVCache, bytes_per_block, kv_quant_scheme
from ember.worker.model_runner import ModelRunner, ModelRunnerOutput

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
        # A GGUF's tokenizer comes from the file resolve_model already parsed.
        self.tokenizer = (
            Tokenizer.from_gguf(source.gguf_file) if source.gguf_file is not None else Tokenizer.from_pretrained(path)
        )
        self.eos_token_ids = list(dict.fromkeys(self.model_config.eos_token_ids + self.tokenizer.eos_token_ids))
        self.max_model_len = self._max_model_len()
        model = load_model(source, self.dtype, config.device, quant)
        kv_cache = self._allocate_kv_cache()
        self.kv_manager = KVCacheManager(
            [(spec.num_blocks, spec.window) for spec in kv_cache.groups], config.block_size, config.enable_prefix_caching
        )
        self.runner = ModelRunner(model, kv_cache, config.device)
        self.scheduler = Scheduler(self.kv_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self._rng = random.Random(config.seed)
        self._requests: dict[str, list[Request]] = {}  # user request id -> its n sequences
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._emitted: dict[int, int] = {}  # chars of output_text already streamed, by id(request)
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
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a prompt (text, token ids, or already processed). Raises InvalidRequestError before
        changing any state. `arrival_time` (time.monotonic) defaults to now; a server passes when the
        HTTP request came in, so queue time and TTFT include its wait before reaching the engine."""
        params = params or SamplingParams()
        text, token_ids = prompt if isinstance(prompt, TokenizedPrompt) else self.process_prompt(prompt)
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self._check_token_ids(params)
        limit = self.max_model_len if params.max_tokens is None else len(token_ids) + params.max_tokens
        if limit > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context limit "
                f"(max_model_len) of {self.max_model_len} tokens; lower max_tokens"
            )
        if not self.kv_manager.can_ever_fit(limit, self.config.max_num_batched_tokens):
            raise InvalidRequestError(
                f"request needs up to {limit} tokens of KV cache, but the cache holds only "
                f"{self.kv_manager.capacity_tokens}; lower max_tokens or raise kv_cache_memory"
            )
        children = []
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else self._rng.getrandbits(63)
            child = Request(
                request_id=request_id if params.n == 1 else f"{index}_{request_id}",
                prompt=text,
                prompt_token_ids=token_ids,
                params=params,
                max_total_len=limit,
                generator=torch.Generator().manual_seed(seed),
                eos_token_ids=self.eos_token_ids,
                parent_id=request_id,
                index=index,
                arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            )
            if params.logprobs is not None:
                child.logprobs, child.cumulative_logprob = [], 0.0
            children.append(child)
        self._requests[request_id] = children
        for child in children:
            self._detokenizers[id(child)] = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            self._emitted[id(child)] = 0
        # Siblings fork off the first one once its prompt is computed, sharing its KV blocks.
        children[0].pending_forks = children[1:]
        self.scheduler.add(children[0])

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
        for child in self._requests.pop(request_id, []):
            self.scheduler.finish(child, FinishReason.ABORT)
            self._forget(child)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one model step; return an output for every user request that advanced."""
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty():
            return []
        result = self.runner.execute(scheduled)
        for item in scheduled.scheduled:
            request = item.request
            if request.request_id in result.prompt_logprobs:
                request.prompt_logprobs = (request.prompt_logprobs or []) + result.prompt_logprobs[request.request_id]
            request.num_computed_tokens += item.num_new_tokens
        self.scheduler.after_step(scheduled)
        touched: dict[str, None] = {}
        for item in scheduled.scheduled:
            for child in item.fork_children:  # before the parent may finish and free the shared blocks
                self._fork(item.request, child, result)
            self._take_sample(item.request, result)
            touched[item.request.parent_id] = None
        return [self._make_output(parent) for parent in touched]

    # -- internals --------------------------------------------------------------------------------

    def _max_model_len(self) -> int:
        model_limit = self.model_config.max_position_embeddings
        wanted = self.config.max_model_len or min(model_limit, _DEFAULT_MAX_MODEL_LEN)
        if wanted > model_limit:
            raise InvalidRequestError(f"max_model_len {wanted} exceeds the model's context of {model_limit} tokens")
        return wanted

    def _allocate_kv_cache(self) -> PagedKVCache:
        """Split the KV budget: sliding-window layers get just enough blocks for every sequence's window
        plus one prompt chunk; full-attention layers get the rest."""
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
        if config.kv_cache_tokens is not None:
            count = -(-config.kv_cache_tokens // block_size)
        else:
            count = budget // block_bytes(layers) - 1
        if count < 2:
            raise InvalidRequestError(
                f"kv_cache_memory of {config.kv_cache_memory} GiB is too small for this model; raise it"
            )
        window = None if full else cfg.sliding_window
        groups.insert(0, KVGroupSpec("full" if full else "sliding", window, layers, count + 1))
        return PagedKVCache(
            groups, block_size, cfg.num_key_value_heads, cfg.head_dim, self.dtype, config.device, config.kv_cache_dtype
        )

    def _fork(self, parent: Request, child: Request, result: ModelRunnerOutput) -> None:
        if self.scheduler.fork(parent, child):
            self._take_sample(child, result)
        else:  # no room to share blocks now: the sibling computes its own prompt later (prefix cache hits)
            self.scheduler.add(child)

    def _take_sample(self, request: Request, result: ModelRunnerOutput) -> None:
        token = result.sampled_token_ids.get(request.request_id)
        if token is None or request.is_finished:
            return
        self._append_token(request, token, result.logprobs[request.request_id], result.logprob_deltas[request.request_id])

    def _append_token(self, request: Request, token: int, logprobs: PositionLogprobs | None, delta: float | None) -> None:
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        request.output_token_ids.append(token)
        if logprobs is not None and request.logprobs is not None:
            for token_id, entry in logprobs.items():
                entry.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
            request.logprobs.append(logprobs)
            request.cumulative_logprob = (request.cumulative_logprob or 0.0) + (delta or 0.0)
        new_text = self._detokenizers[id(request)].add(token)
        request.output_text += new_text
        reason = self._stop_check(request, token, len(new_text))
        if reason is None:
            return
        if not isinstance(request.stop_reason, str):  # text cut at a stop string needs nothing more
            request.output_text += self._detokenizers[id(request)].flush()
        self.scheduler.finish(request, reason)

    def _stop_check(self, request: Request, token: int, new_chars: int) -> FinishReason | None:
        params = request.params
        if len(request.output_token_ids) >= params.min_tokens:
            if token in request.eos_token_ids and not params.ignore_eos:
                return FinishReason.STOP
            if token in params.stop_token_ids:
                request.stop_reason = token
                return FinishReason.STOP
            if self._truncate_at_stop_string(request, new_chars):
                return FinishReason.STOP
        if request.num_tokens >= request.max_total_len:
            return FinishReason.LENGTH
        return None

    def _truncate_at_stop_string(self, request: Request, new_chars: int) -> bool:
        params = request.params
        if not params.stop_strings or new_chars == 0:
            return False
        longest = max(len(s) for s in params.stop_strings)
        # Only a stop string ending in the new text can be new.
        search_from = max(0, len(request.output_text) - new_chars - longest + 1)
        for stop in params.stop_strings:
            found = request.output_text.find(stop, search_from)
            if found != -1:
                end = found + len(stop) if params.include_stop_str_in_output else found
                request.output_text = request.output_text[:end]
                request.stop_reason = stop
                return True
        return False

    def _make_output(self, parent_id: str) -> RequestOutput:
        children = self._requests[parent_id]
        first = children[0]
        completions = [self._completion(child) for child in children]
        finished = all(child.is_finished for child in children)
        if finished:
            del self._requests[parent_id]
            for child in children:
                self._forget(child)
        return RequestOutput(
            request_id=parent_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=first.prompt_logprobs,
            metrics=RequestMetrics(
                arrival_time=first.arrival_time,
                first_scheduled_time=first.first_scheduled_time,
                first_token_time=first.first_token_time,
                finished_time=time.monotonic() if finished else None,
            ),
        )

    def _completion(self, request: Request) -> CompletionOutput:
        emitted = self._emitted.get(id(request), len(request.output_text))
        text = request.output_text
        visible = len(text)
        if not request.is_finished and request.params.stop_strings:
            # Hold back a tail that may turn out to be the start of a stop string.
            visible = max(emitted, len(text) - max(len(s) for s in request.params.stop_strings) + 1)
        self._emitted[id(request)] = visible
        return CompletionOutput(
            index=request.index,
            text=text[:visible] if not request.is_finished else text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=request.cumulative_logprob,
            logprobs=request.logprobs,
            finish_reason=request.finish_reason.value if request.finish_reason else None,
            stop_reason=request.stop_reason,
            delta_text=text[emitted:visible] if not request.is_finished else text[emitted:],
        )

    def _forget(self, request: Request) -> None:
        self._detokenizers.pop(id(request), None)
        self._emitted.pop(id(request), None)
