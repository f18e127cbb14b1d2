"""OpenAI completions, chat completions, embeddings and vLLM's tokenizer routes on top of AsyncLLM:
request -> engine requests -> JSON or SSE.

Each prompt of a request is one engine request (its n completions are forks inside the engine; with
use_beam_search, one beam search of n beams). A response is built from the engine's RequestOutputs: the
streamed form sends each step's new text (`delta_text`) and the log-probabilities of the new tokens (a
beam search, whose hypotheses are known only at its end, sends them whole then); the plain form waits for
the end. best_of > n samples best_of completions and returns the n with the highest mean log-probability.

CPU-heavy preprocessing (chat-template rendering, tokenization, long detokenization) runs in a thread
pool, never on the event loop: a request with a megabyte prompt must not delay anyone else's /health.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import ember
from ember.engine.async_engine import AsyncLLM, RequestStream
from ember.engine.llm_engine import TokenizedPrompt
from ember.errors import EmberError, InvalidRequestError
from ember.metrics import ServingMetrics
from ember.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ember.sampling_params import BeamSearchParams, SamplingParams
from ember.scaling.selection import mean_logprob
from ember.server.chat_template import ChatTemplates
from ember.server.embeddings import batches, mean_pooled
from ember.server.errors import FieldError, ModelNotServedError
from ember.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest, VerifyRequest,
)
from ember.server.tools import ToolCall, ToolCallParser, parse_tool_calls
from ember.verify import TokenVerifier, VerifyReport, claim_from_dict

logger = logging.getLogger("ember")

Json = dict[str, Any]
T = TypeVar("T")


@dataclass
class _ChoiceState:
    """What a streamed choice has sent so far."""

    tokens_sent: int = 0
    text_offset: int = 0
    finished: bool = False
    tool_calls: ToolCallParser | None = None  # when the request's tools are called in the text


@dataclass
class Job:
    """The engine requests of one HTTP request, with what is needed to shape the response."""

    kind: str  # "text_completion" or "chat.completion"
    response_id: str
    created: int
    params: SamplingParams  # what each prompt samples (n = best_of when the server selects)
    prompts: list[TokenizedPrompt]
    streams: list[RequestStream]
    n: int  # choices returned per prompt
    logprobs: int | None  # the top log-probabilities the client asked for (None: no logprobs)
    echo: bool = False
    include_usage: bool = False
    prompt_only: bool = False  # max_tokens 0: the engine's one generated token is dropped
    called_tools: list[str] | None = None  # chat with tools: their calls in the text become message.tool_calls
    choices: dict[int, _ChoiceState] = field(default_factory=dict)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as they come, with the generated token dropped for `prompt_only`."""
        merged = _merge(self.streams)
        return _without_generated(merged) if self.prompt_only else merged


class OpenAIServing:
    def __init__(
        self, llm: AsyncLLM, model_name: str, metrics: ServingMetrics, templates: ChatTemplates, preprocess: Executor
    ) -> None:
        self.llm = llm
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = llm.tokenizer
        self.templates = templates
        self.preprocess = preprocess
        self.system_fingerprint = _fingerprint(llm, model_name)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotServedError(f"the model `{model}` does not exist; this server serves `{self.model_name}`")

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.preprocess, functools.partial(fn, *args))

    # -- entry points -----------------------------------------------------------------------------

    async def start_completion(self, request: CompletionRequest, arrival: float) -> Job:
        self.check_model(request.model)
        params = request.sampling_params()
        add_special = request.add_special_tokens is not False
        prompts = await self._off_loop(self._prompts, request.prompts(), add_special, "prompt")
        job = Job("text_completion", f"cmpl-{uuid.uuid4().hex}", int(time.time()), params, prompts, [], request.n,
                   request.logprobs, request.echo, request.include_usage, request.scores_prompt_only)  # fmt: skip
        return await self._start(job, arrival, request)

    async def start_chat(self, request: ChatCompletionRequest, arrival: float) -> Job:
        self.check_model(request.model)
        params = request.sampling_params()
        prompt = await self._off_loop(self._chat_prompt, request, bool(request.add_special_tokens))
        job = Job("chat.completion", f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), params, [prompt], [], request.n,
                   params.logprobs, include_usage=request.include_usage, called_tools=request.called_tools)  # fmt: skip
        return await self._start(job, arrival, request)

    async def _start(self, job: Job, arrival: float, request: CompletionRequest | ChatCompletionRequest) -> Job:
        try:
            for i, prompt in enumerate(job.prompts):
                params = self._engine_params(job, request, prompt)
                job.streams.append(await self.llm.add_request(f"{job.response_id}-{i}", prompt, params, arrival))
        except InvalidRequestError as e:  # the engine's checks (context length, vocabulary)
            job.close()
            raise request.blame(e, type(request).model_fields) from e
        except BaseException:
            job.close()
            raise
        return job

    def _engine_params(
        self, job: Job, request: CompletionRequest | ChatCompletionRequest, prompt: TokenizedPrompt
    ) -> SamplingParams | BeamSearchParams:
        if not request.use_beam_search:
            return job.params
        # Without max_tokens a hypothesis may run to the context limit.
        max_tokens = job.params.max_tokens or self.llm.max_model_len - len(prompt.token_ids)
        return request.beam_search_params(max_tokens)

    async def tokenize(self, request: TokenizeRequest) -> Json:
        self.check_model(request.model)
        tokens = await self._off_loop(self._tokenize, request)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.llm.max_model_len}

    async def detokenize(self, request: DetokenizeRequest) -> Json:
        self.check_model(request.model)
        return {"prompt": await self._off_loop(self._detokenize, request.tokens)}

    async def embed(self, request: EmbeddingRequest) -> Json:
        self.check_model(request.model)
        prompts = await self._off_loop(self._prompts, request.inputs(), request.add_special_tokens, "input")
        vectors: list[list[float]] = []
        # One command per batch, so generation steps run between the batches of a large request.
        for batch in batches([p.token_ids for p in prompts], self.llm.engine.config.max_num_batched_tokens):
            vectors += await self.llm.run_in_step_loop(functools.partial(mean_pooled, prompts=batch))
        count = sum(len(p.token_ids) for p in prompts)
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, request.encoding_format)}
                for i, v in enumerate(vectors)]  # fmt: skip
        return {"object": "list", "data": data, "model": self.model_name, "pooling": "mean",
                "usage": {"prompt_tokens": count, "total_tokens": count}}  # fmt: skip

    async def verify(self, request: VerifyRequest) -> Json:
        """Token-DiFR scores of the claims against the served model, a batch of claims per call into the step
        loop so generation steps run between batches."""
        self.check_model(request.model)
        vocab = self.llm.engine.model_config.vocab_size
        claims = []
        for i, raw in enumerate(request.claims):
            try:
                claims.append(claim_from_dict(raw, vocab))
            except InvalidRequestError as e:
                raise FieldError(f"claims[{i}]: {e}", f"claims[{i}]") from e
        verifier = TokenVerifier(self.llm.engine)
        start, results = time.perf_counter(), []
        for first in range(0, len(claims), verifier.batch_size):
            batch = claims[first : first + verifier.batch_size]
            try:
                results += await self.llm.run_in_step_loop(lambda _, batch=batch: verifier.verify_batch(batch))
            except InvalidRequestError as e:  # a claim longer than the context
                raise FieldError(f"claims: {e}", "claims") from e
        return VerifyReport(results, time.perf_counter() - start).to_dict()

    def model_card(self) -> Json:
        return {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "ember",
                "max_model_len": self.llm.max_model_len}  # fmt: skip

    def tokenizer_info(self) -> Json:
        tokenizer = self.tokenizer
        names = tokenizer.special_tokens
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",  # ember's tokenizer matches transformers' fast one
            **{name: names.get(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
            "chat_template": tokenizer.chat_template,
            "model_max_length": self.llm.max_model_len,
            "vocab_size": tokenizer.vocab_size,
        }

    # -- preprocessing (in the thread pool) -------------------------------------------------------

    def _prompts(
        self, prompts: Sequence[str | list[int]], add_special_tokens: bool, param: str
    ) -> list[TokenizedPrompt]:
        return [self._prompt(p, add_special_tokens, param) for p in prompts]

    def _prompt(self, prompt: str | list[int], add_special_tokens: bool, param: str) -> TokenizedPrompt:
        """Tokenized and checked against the vocabulary and the context; errors name `param`."""
        try:
            if isinstance(prompt, list):
                return self.llm.process_prompt(prompt)
            token_ids = self.llm.process_prompt(self._encode(prompt, add_special_tokens)).token_ids
        except InvalidRequestError as e:
            raise FieldError(str(e) if str(e).startswith(param) else f"{param}: {e}", param) from e
        return TokenizedPrompt(prompt, token_ids)

    def _render(self, request: ChatCompletionRequest | TokenizeRequest) -> str:
        return self.templates.render(request.conversation(), request.add_generation_prompt, request.chat_template,
                                     request.template_variables())  # fmt: skip

    def _chat_prompt(self, request: ChatCompletionRequest, add_special_tokens: bool) -> TokenizedPrompt:
        # The template writes BOS itself where the model wants one.
        return self._prompt(self._render(request), add_special_tokens, "messages")

    def _tokenize(self, request: TokenizeRequest) -> list[int]:
        if request.messages is not None:
            return self._encode(self._render(request), False)
        return self._encode(request.prompt or "", request.add_special_tokens)

    def _detokenize(self, tokens: list[int]) -> str:
        vocab = self.llm.engine.model_config.vocab_size
        if not all(0 <= t < vocab for t in tokens):
            raise FieldError(f"tokens: token ids must be in [0, {vocab})", "tokens")
        return self.tokenizer.backend.decode_batch([tokens], skip_special_tokens=False)[0]  # see _encode

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # The batch calls of `tokenizers` release the GIL while they work; the single-text ones hold it (a
        # megabyte prompt would stop the event loop for seconds, thread pool or not).
        return self.tokenizer.encode_batch([text], add_special_tokens)[0]

    # -- responses --------------------------------------------------------------------------------

    async def full_response(self, job: Job) -> Json:
        """Wait for every completion and build the non-streamed response."""
        finals: list[RequestOutput | None] = [None] * len(job.streams)
        try:
            async for index, output in job.outputs():
                finals[index] = output
        finally:
            job.close()
            for output in finals:
                if output is not None:
                    self.metrics.record(output)
        choices = []
        for prompt_index, output in enumerate(finals):
            assert output is not None
            for completion in _best(output.outputs, job.n):
                choices.append(self._full_choice(job, prompt_index, output, completion))
        return {**self._envelope(job, job.kind), "choices": choices, "usage": _usage(finals)}

    async def stream_response(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events: one `data:` chunk per step with new text, `data: [DONE]` at the end."""
        last: list[RequestOutput | None] = [None] * len(job.streams)
        try:
            if job.kind == "chat.completion":
                yield _sse(self._chunk(job, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None} for i in range(job.n)]))
            async for prompt_index, output in job.outputs():
                last[prompt_index] = output
                choices = [
                    choice
                    for completion in _best(output.outputs, job.n)
                    if (choice := self._stream_choice(job, prompt_index, output, completion)) is not None
                ]
                if choices:
                    yield _sse(self._chunk(job, choices))
            if job.include_usage:
                yield _sse(self._chunk(job, [], usage=_usage(last)))
            yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is sent: tell the client in-band, and end the stream cleanly
            if not isinstance(e, EmberError):
                logger.exception("ember: stream of %s failed", job.response_id)
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})
        finally:
            job.close()
            for output in last:
                if output is not None:
                    self.metrics.record(output)

    # -- response pieces --------------------------------------------------------------------------

    def _envelope(self, job: Job, kind: str) -> Json:
        return {"id": job.response_id, "object": kind, "created": job.created, "model": self.model_name,
                "system_fingerprint": self.system_fingerprint}  # fmt: skip

    def _chunk(self, job: Job, choices: list[Json], usage: Json | None = None) -> Json:
        kind = "chat.completion.chunk" if job.kind == "chat.completion" else "text_completion"
        chunk: Json = {**self._envelope(job, kind), "choices": choices}
        if job.include_usage:
            chunk["usage"] = usage
        return chunk

    def _full_choice(self, job: Job, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> Json:
        index = prompt_index * job.n + completion.index
        if job.kind == "chat.completion":
            message: Json = {"role": "assistant", "content": completion.text}
            finish = completion.finish_reason
            if job.called_tools is not None:
                content, calls = parse_tool_calls(completion.text, job.called_tools)
                message = {"role": "assistant", "content": content, "tool_calls": [c.as_json() for c in calls]}
                finish = _tool_finish(finish, len(calls))
            return {
                "index": index,
                "message": message,
                "logprobs": self._chat_logprobs(completion, 0, job.logprobs) if job.logprobs is not None else None,
                "finish_reason": finish,
                "stop_reason": completion.stop_reason,
                "seed": completion.seed,
            }
        text = completion.text
        logprobs = None
        if job.logprobs is not None:
            state = _ChoiceState()
            logprobs = self._echo_logprobs(output, state) if job.echo else _empty_legacy()
            _extend_legacy(logprobs, self._legacy_logprobs(completion, 0, state))
        if job.echo:
            text = self._prompt_text(job.prompts[prompt_index]) + text
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason,
            "seed": completion.seed,
        }

    def _stream_choice(self, job: Job, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> Json | None:
        index = prompt_index * job.n + completion.index
        state = job.choices.get(index)
        first = state is None
        if state is None:
            parser = None if job.called_tools is None else ToolCallParser(job.called_tools)
            state = job.choices[index] = _ChoiceState(tool_calls=parser)
        if state.finished:
            return None
        text = completion.delta_text
        start = state.tokens_sent
        state.tokens_sent = len(completion.token_ids)
        state.finished = completion.finish_reason is not None
        if not text and not state.finished and state.tokens_sent == start:
            return None
        finish = completion.finish_reason
        if job.kind == "chat.completion":
            logprobs = self._chat_logprobs(completion, start, job.logprobs) if job.logprobs is not None else None
            delta: Json = {"content": text} if text else {}
            if state.tool_calls is not None:
                delta, finish = _tool_delta(state.tool_calls, text, finish)
                if not delta and finish is None and logprobs is None:  # all held back: nothing to say yet
                    return None
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                    "stop_reason": completion.stop_reason if finish else None, "seed": completion.seed}
        legacy = None
        if job.logprobs is not None:
            legacy = self._echo_logprobs(output, state) if job.echo and first else _empty_legacy()
            _extend_legacy(legacy, self._legacy_logprobs(completion, start, state))
        if job.echo and first:
            text = self._prompt_text(job.prompts[prompt_index]) + text
        return {"index": index, "text": text, "logprobs": legacy, "finish_reason": finish,
                "stop_reason": completion.stop_reason if finish else None, "seed": completion.seed}

    def _prompt_text(self, prompt: TokenizedPrompt) -> str:
        return prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _legacy_logprobs(self, completion: CompletionOutput, start: int, state: _ChoiceState) -> Json:
        """The completions API's log-probability lists for tokens[start:]."""
        out = _empty_legacy()
        entries = completion.logprobs or []
        for token_id, position in zip(completion.token_ids[start:], entries[start:]):
            self._append_legacy(out, token_id, position, state)
        return out

    def _echo_logprobs(self, output: RequestOutput, state: _ChoiceState) -> Json:
        out = _empty_legacy()
        positions = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
        for token_id, position in zip(output.prompt_token_ids, positions):
            self._append_legacy(out, token_id, position, state)
        return out

    def _append_legacy(self, out: Json, token_id: int, position: PositionLogprobs | None, state: _ChoiceState) -> None:
        text = self._token_text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(state.text_offset)
        state.text_offset += len(text)
        if position is None:  # the first prompt token has no prediction
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            return
        out["token_logprobs"].append(position[token_id].logprob if token_id in position else None)
        # As vLLM: the top-k plus the chosen token when it ranks lower.
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in position.items())
        out["top_logprobs"].append({self._token_text(t): logprob for _, t, logprob in ranked})

    def _chat_logprobs(self, completion: CompletionOutput, start: int, top_k: int) -> Json:
        """The chat API's log-probabilities of tokens[start:]: the chosen token and exactly the top-k."""
        content = []
        entries = completion.logprobs or []
        for token_id, position in zip(completion.token_ids[start:], entries[start:]):
            chosen = position.get(token_id)
            ranked = sorted((lp.rank, t, lp.logprob) for t, lp in position.items() if lp.rank <= top_k)
            content.append({
                **self._chat_token(token_id, chosen.logprob if chosen else None),
                "top_logprobs": [self._chat_token(t, logprob) for _, t, logprob in ranked],
            })
        return {"content": content}

    def _chat_token(self, token_id: int, logprob: float | None) -> Json:
        return {"token": self._token_text(token_id), "logprob": logprob, "bytes": list(self.tokenizer.token_bytes(token_id))}


def _best(completions: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The n choices to return: all of them, a beam search's first n (its hypotheses come best first), or
    best_of's n with the highest mean log-probability per token (the earlier one on a tie), renumbered."""
    if len(completions) <= n:
        return completions
    if completions[0].score is None:
        completions = sorted(completions, key=lambda c: -mean_logprob("", c))  # stable: ties keep their order
    return [replace(c, index=rank) for rank, c in enumerate(completions[:n])]


def _fingerprint(llm: AsyncLLM, model_name: str) -> str:
    """OpenAI's system_fingerprint: changes when anything that can change outputs for the same request does."""
    config = llm.engine.config
    setup = (ember.__version__, model_name, str(llm.engine.dtype), config.quantization, config.kv_cache_dtype,
             config.lm_head_quantization, config.speculative_config)  # fmt: skip
    return "fp_" + hashlib.sha256(repr(setup).encode()).hexdigest()[:12]


def _encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: the raw little-endian float32 values
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def _without_generated(
    outputs: AsyncIterator[tuple[int, RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs with nothing generated: max_tokens 0 scores the prompt only (its logprobs stay)."""
    async for index, output in outputs:
        completions = [
            replace(c, text="", token_ids=[], delta_text="", cumulative_logprob=None, stop_reason=None,
                    logprobs=None if c.logprobs is None else [],
                    finish_reason=None if c.finish_reason is None else "length")  # fmt: skip
            for c in output.outputs
        ]
        yield index, replace(output, outputs=completions)


def _tool_finish(finish_reason: str | None, num_calls: int) -> str | None:
    """OpenAI's `tool_calls` when the model called tools and stopped by itself (not cut off by a limit)."""
    return "tool_calls" if num_calls and finish_reason == "stop" else finish_reason


def _tool_delta(parser: ToolCallParser, text: str, finish_reason: str | None) -> tuple[Json, str | None]:
    """A streamed choice's delta with tool calls: content as it is certain, each call whole once it closes."""
    first = parser.num_calls
    events = parser.feed(text) + (parser.finish() if finish_reason is not None else [])
    delta: Json = {}
    content = "".join(e for e in events if isinstance(e, str))
    if content:
        delta["content"] = content
    calls = [e for e in events if isinstance(e, ToolCall)]
    if calls:
        delta["tool_calls"] = [{"index": first + i, **call.as_json()} for i, call in enumerate(calls)]
    return delta, _tool_finish(finish_reason, parser.num_calls)


def _empty_legacy() -> Json:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _extend_legacy(target: Json, more: Json) -> None:
    for key in target:
        target[key].extend(more[key])


def _usage(outputs: list[RequestOutput | None]) -> Json:
    prompt = sum(len(o.prompt_token_ids) for o in outputs if o is not None)
    completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: Json) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as e:
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()

