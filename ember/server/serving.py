"""OpenAI completions and chat completions on top of AsyncLLM: request -> engine requests -> JSON or SSE.

Each prompt of a request is one engine request (its n completions are forks inside the engine). A
response is built from the engine's RequestOutputs: the streamed form sends each step's new text
(`delta_text`) and the log-probabilities of the new tokens; the plain form waits for the end.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ember.engine.async_engine import AsyncLLM, RequestStream
from ember.engine.llm_engine import TokenizedPrompt
from ember.errors import EmberError, InvalidRequestError
from ember.metrics import ServingMetrics
from ember.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ember.sampling_params import SamplingParams
from ember.server.protocol import ChatCompletionRequest, CompletionRequest

Json = dict[str, Any]


class ModelNotServedError(InvalidRequestError):
    """The request names a model this server doesn't serve (404)."""


@dataclass
class _ChoiceState:
    """What a streamed choice has sent so far."""

    tokens_sent: int = 0
    text_offset: int = 0
    finished: bool = False


@dataclass
class _Job:
    """The engine requests of one HTTP request, with what is needed to shape the response."""

    kind: str  # "text_completion" or "chat.completion"
    response_id: str
    created: int
    params: SamplingParams
    prompts: list[TokenizedPrompt]
    streams: list[RequestStream]
    echo: bool = False
    include_usage: bool = False
    choices: dict[int, _ChoiceState] = field(default_factory=dict)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, model_name: str, metrics: ServingMetrics) -> None:
        self.llm = llm
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = llm.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotServedError(f"the model `{model}` does not exist; this server serves `{self.model_name}`")

    # -- entry points -----------------------------------------------------------------------------

    async def start_completion(self, request: CompletionRequest, arrival: float) -> _Job:
        self.check_model(request.model)
        params = request.sampling_params()
        prompts = [self.llm.process_prompt(p) for p in request.prompts()]
        return await self._start("text_completion", "cmpl", prompts, params, arrival, request.echo, request.include_usage)

    async def start_chat(self, request: ChatCompletionRequest, arrival: float) -> _Job:
        self.check_model(request.model)
        params = request.sampling_params()
        text = self.tokenizer.apply_chat_template(
            request.conversation(), add_generation_prompt=request.add_generation_prompt, chat_template=request.chat_template
        )
        # The template writes BOS itself where the model wants one.
        prompt = self.llm.process_prompt(self.tokenizer.encode(text, add_special_tokens=False))
        prompt = TokenizedPrompt(text, prompt.token_ids)
        return await self._start("chat.completion", "chatcmpl", [prompt], params, arrival, False, request.include_usage)

    async def _start(
        self, kind: str, prefix: str, prompts: list[TokenizedPrompt], params: SamplingParams, arrival: float,
        echo: bool, include_usage: bool,
    ) -> _Job:
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        job = _Job(kind, response_id, int(time.time()), params, prompts, [], echo, include_usage)
        try:
            for i, prompt in enumerate(prompts):
                job.streams.append(await self.llm.add_request(f"{response_id}-{i}", prompt, params, arrival))
        except BaseException:
            job.close()
            raise
        return job

    async def full_response(self, job: _Job) -> Json:
        """Wait for every completion and build the non-streamed response."""
        finals: list[RequestOutput | None] = [None] * len(job.streams)
        try:
            async for index, output in _merge(job.streams):
                finals[index] = output
        finally:
            job.close()
            for output in finals:
                if output is not None:
                    self.metrics.record(output)
        choices = []
        for prompt_index, output in enumerate(finals):
            assert output is not None
            for completion in output.outputs:
                choices.append(self._full_choice(job, prompt_index, output, completion))
        body: Json = {
            "id": job.response_id,
            "object": job.kind,
            "created": job.created,
            "model": self.model_name,
            "choices": choices,
            "usage": _usage(finals),
        }
        return body

    async def stream_response(self, job: _Job) -> AsyncIterator[str]:
        """Server-sent events: one `data:` chunk per step with new text, `data: [DONE]` at the end."""
        last: list[RequestOutput | None] = [None] * len(job.streams)
        try:
            if job.kind == "chat.completion":
                yield _sse(self._chunk(job, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None} for i in range(job.params.n)]))
            async for prompt_index, output in _merge(job.streams):
                last[prompt_index] = output
                choices = [
                    choice
                    for completion in output.outputs
                    if (choice := self._stream_choice(job, prompt_index, output, completion)) is not None
                ]
                if choices:
                    yield _sse(self._chunk(job, choices))
            if job.include_usage:
                yield _sse(self._chunk(job, [], usage=_usage(last)))
            yield "data: [DONE]\n\n"
        except EmberError as e:  # the engine failed this request mid-stream: tell the client in-band
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})
        finally:
            job.close()
            for output in last:
                if output is not None:
                    self.metrics.record(output)

    # -- response pieces --------------------------------------------------------------------------

    def _chunk(self, job: _Job, choices: list[Json], usage: Json | None = None) -> Json:
        chunk: Json = {
            "id": job.response_id,
            "object": "chat.completion.chunk" if job.kind == "chat.completion" else "text_completion",
            "created": job.created,
            "model": self.model_name,
            "choices": choices,
        }
        if job.include_usage:
            chunk["usage"] = usage
        return chunk

    def _full_choice(self, job: _Job, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> Json:
        index = prompt_index * job.params.n + completion.index
        if job.kind == "chat.completion":
            return {
                "index": index,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": self._chat_logprobs(completion, 0, job.params.logprobs) if job.params.logprobs is not None else None,
                "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason,
            }
        text = completion.text
        logprobs = None
        if job.params.logprobs is not None:
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
        }

    def _stream_choice(self, job: _Job, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> Json | None:
        index = prompt_index * job.params.n + completion.index
        state = job.choices.get(index)
        first = state is None
        if state is None:
            state = job.choices[index] = _ChoiceState()
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
            logprobs = self._chat_logprobs(completion, start, job.params.logprobs) if job.params.logprobs is not None else None
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": finish, "stop_reason": completion.stop_reason if finish else None}
        legacy = None
        if job.params.logprobs is not None:
            legacy = self._echo_logprobs(output, state) if job.echo and first else _empty_legacy()
            _extend_legacy(legacy, self._legacy_logprobs(completion, start, state))
        if job.echo and first:
            text = self._prompt_text(job.prompts[prompt_index]) + text
        return {"index": index, "text": text, "logprobs": legacy, "finish_reason": finish,
                "stop_reason": completion.stop_reason if finish else None}

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

