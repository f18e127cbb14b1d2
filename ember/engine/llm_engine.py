"""LLMEngine: add / abort requests and advance them all one step at a time."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ember.config import EngineConfig, resolve_dtype
from ember.engine.request import FinishReason, Request
from ember.engine.scheduler import Scheduler, ScheduledRequest
from ember.errors import InvalidRequestError
from ember.loader.model_loader import load_model, resolve_model
from ember.model_zoo import default_model_path
from ember.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ember.sampling_params import SamplingParams
from ember.tokenizer import IncrementalDetokenizer, Tokenizer
from ember.worker.kv_cache import ContiguousKVCache
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
        # A GGUF's tokenizer comes from the file resolve_model already parsed.
        self.tokenizer = (
            Tokenizer.from_gguf(source.gguf_file) if source.gguf_file is not None else Tokenizer.from_pretrained(path)
        )
        self.eos_token_ids = list(dict.fromkeys(self.model_config.eos_token_ids + self.tokenizer.eos_token_ids))
        self.max_model_len = self._max_model_len()
        model = load_model(source, self.dtype, config.device)
        kv_cache = self._allocate_kv_cache()
        self.runner = ModelRunner(model, kv_cache, config.device)
        self.scheduler = Scheduler(kv_cache.num_slots, config.max_num_seqs, config.max_num_batched_tokens)
        self._rng = random.Random(config.seed)
        self._requests: dict[str, list[Request]] = {}  # user request id -> its n sequences
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._emitted: dict[int, int] = {}  # chars of output_text already streamed, by id(request)
        logger.info(
            "ember: %s (%s, %s) on %s; context %d tokens, %d KV slots",
            path, self.model_config.architecture, self.dtype, config.device, self.max_model_len, kv_cache.num_slots,
        )

    # -- public API -------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | Sequence[int] | TokenizedPrompt, params: SamplingParams | None = None
    ) -> None:
        """Queue a prompt (text, token ids, or already processed). Raises InvalidRequestError before
        changing any state."""
        params = params or SamplingParams()
        text, token_ids = prompt if isinstance(prompt, TokenizedPrompt) else self.process_prompt(prompt)
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        limit = self.max_model_len if params.max_tokens is None else len(token_ids) + params.max_tokens
        children = []
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else self._rng.getrandbits(63)
            child = Request(
                request_id=request_id if params.n == 1 else f"{index}_{request_id}",
                prompt=text,
                prompt_token_ids=token_ids,
                params=params,
                max_total_len=min(limit, self.max_model_len),
                generator=torch.Generator().manual_seed(seed),
                eos_token_ids=self.eos_token_ids,
                parent_id=request_id,
                index=index,
            )
            if params.logprobs is not None:
                child.logprobs, child.cumulative_logprob = [], 0.0
            children.append(child)
        self._requests[request_id] = children
        for child in children:
            self._detokenizers[id(child)] = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            self._emitted[id(child)] = 0
            self.scheduler.add(child)

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
        touched: dict[str, None] = {}
        for item in scheduled.scheduled:
            self._update(item, result)
            touched[item.request.parent_id] = None
        return [self._make_output(parent) for parent in touched]

    # -- internals --------------------------------------------------------------------------------

    def _max_model_len(self) -> int:
        model_limit = self.model_config.max_position_embeddings
        wanted = self.config.max_model_len or min(model_limit, _DEFAULT_MAX_MODEL_LEN)
        if wanted > model_limit:
            raise InvalidRequestError(f"max_model_len {wanted} exceeds the model's context of {model_limit} tokens")
        return wanted

    def _allocate_kv_cache(self) -> ContiguousKVCache:
        cfg = self.model_config
        per_token = ContiguousKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, self.dtype)
        budget = int(self.config.kv_cache_memory * (1 << 30))
        slots = min(self.config.max_num_seqs, budget // (per_token * self.max_model_len))
        if slots < 1:
            raise InvalidRequestError(
                f"kv_cache_memory of {self.config.kv_cache_memory} GiB cannot hold one sequence of "
                f"{self.max_model_len} tokens ({per_token * self.max_model_len / (1 << 30):.2f} GiB); "
                "raise it or lower max_model_len"
            )
        return ContiguousKVCache(
            cfg.num_hidden_layers, slots, self.max_model_len, cfg.num_key_value_heads, cfg.head_dim, self.dtype, self.config.device
        )

    def _update(self, item: ScheduledRequest, result: ModelRunnerOutput) -> None:
        request = item.request
        if request.is_finished:
            return
        if request.request_id in result.prompt_logprobs:
            request.prompt_logprobs = (request.prompt_logprobs or []) + result.prompt_logprobs[request.request_id]
        request.num_computed_tokens += item.num_new_tokens
        token = result.sampled_token_ids.get(request.request_id)
        if token is None:
            return
        self._append_token(request, token, result.logprobs[request.request_id], result.logprob_deltas[request.request_id])

    def _append_token(self, request: Request, token: int, logprobs: PositionLogprobs | None, delta: float | None) -> None:
        request.output_token_ids.append(token)
        if logprobs is not None and request.logprobs is not None:
            for token_id, entry in logprobs.items():
                entry.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
            request.logprobs.append(logprobs)
            request.cumulative_logprob = (request.cumulative_logprob or 0.0) + (delta or 0.0)
        new_text = self._detokenizers[id(request)].add(token)
        request.output_text += new_text
        reason = self._stop_check(request, token, len(new_text))
        if reason is not None:
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
