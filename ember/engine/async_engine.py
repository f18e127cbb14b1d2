"""AsyncLLM: the engine's step loop on a background thread, driven by asyncio callers (the server).

Callers never touch the engine's state: they send commands (add, abort) through a queue that the
step loop drains between steps, and each request gets its outputs through its own asyncio.Queue.
Prompts are tokenized by the caller (the tokenizer is thread-safe), so a long prompt never delays a
step. The model's work runs in torch ops that release the GIL, so the event loop keeps serving HTTP
while a step runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine, TokenizedPrompt
from ember.engine.scheduler import SpecDecodeStats
from ember.errors import EmberError
from ember.outputs import RequestOutput
from ember.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger("ember")

T = TypeVar("T")


class QueueFullError(EmberError):
    """More requests are waiting than the server admits (answered with 429)."""


class EngineStepError(EmberError):
    """A step failed; the requests it held are aborted (the engine keeps serving the others)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot published by the step loop after every step (read by /metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    kv_blocks_used: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    spec_decode: SpecDecodeStats = field(default_factory=SpecDecodeStats)


class RequestStream:
    """One request's outputs, in order. Iterate it; `close()` (always call it, e.g. in a finally) aborts
    the request if it hasn't finished, so a client that went away frees its KV blocks at the next step."""

    def __init__(self, llm: AsyncLLM, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False
        self._llm = llm

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._llm.abort(self.request_id)


class AsyncLLM:
    def __init__(self, config: EngineConfig, max_waiting_requests: int | None = None) -> None:
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.max_waiting_requests = max_waiting_requests
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()  # guards _streams and _adds_in_flight across the two threads
        self._adds_in_flight = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ember-step-loop", daemon=True)
        self._thread.start()

    # -- caller side (event loop thread) ----------------------------------------------------------

    def process_prompt(self, prompt: str | Sequence[int]) -> TokenizedPrompt:
        return self.engine.process_prompt(prompt)

    @property
    def num_waiting(self) -> int:
        return self.stats.num_waiting + self._adds_in_flight

    async def add_request(
        self,
        request_id: str,
        prompt: TokenizedPrompt,
        params: SamplingParams | BeamSearchParams,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request; returns once the step loop has accepted it (InvalidRequestError otherwise),
        before any token is computed, so a server can still answer 400 instead of starting a stream."""
        if self._stopped:
            raise EngineStepError("the engine is shut down")
        if isinstance(params, SamplingParams) and params.structured_outputs is not None:
            # Compiled on the backend's pool while the step loop runs; a bad grammar fails here (400).
            await asyncio.wrap_future(self.engine.structured.submit(params.structured_outputs))
        with self._lock:
            if self.max_waiting_requests is not None and self.num_waiting >= self.max_waiting_requests:
                raise QueueFullError(
                    f"the server is at capacity ({self.max_waiting_requests} requests waiting); retry later"
                )
            if request_id in self._streams:
                raise EmberError(f"request id {request_id!r} is already in use")
            stream = RequestStream(self, request_id, asyncio.get_running_loop())
            self._streams[request_id] = stream
            self._adds_in_flight += 1
        added: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._send("add", (request_id, prompt, params, arrival_time or time.monotonic(), added))
        try:
            await asyncio.wrap_future(added)
        except BaseException:
            stream.close()  # cancelled while queued: make sure it doesn't run unseen
            raise
        return stream

    async def generate(
        self, request_id: str, prompt: TokenizedPrompt, params: SamplingParams, arrival_time: float | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield a request's outputs until it finishes; closing the iterator early aborts it."""
        stream = await self.add_request(request_id, prompt, params, arrival_time)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    async def run_in_step_loop(self, fn: Callable[[LLMEngine], T]) -> T:
        """`fn(engine)` on the step loop's thread, between two steps: work on the engine's model outside
        any request (e.g. an embedding forward) that must never run concurrently with a step."""
        if self._stopped:
            raise EngineStepError("the engine is shut down")
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._send("call", (fn, done))
        return await asyncio.wrap_future(done)

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    def _send(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wakeup.set()

    # -- step loop (its own thread) ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped:
            self._drain_commands()
            if not self.engine.has_unfinished_requests():
                self._publish_stats()
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug: fail what this step held, keep serving new requests
                logger.exception("ember: engine step failed; aborting the requests it held")
                self._fail_all(EngineStepError(f"internal error in the engine step: {type(e).__name__}: {e}"))
                continue
            for output in outputs:
                self._deliver(output.request_id, output, finished=output.finished)
            self._publish_stats()

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(*payload)
            elif kind == "abort":
                self.engine.abort_request(payload)
                with self._lock:
                    self._streams.pop(payload, None)
            elif kind == "call":
                self._call(*payload)

    def _call(self, fn: Callable[[LLMEngine], Any], done: concurrent.futures.Future[Any]) -> None:
        if not done.set_running_or_notify_cancel():  # the caller went away while it was queued
            return
        try:
            done.set_result(fn(self.engine))
        except Exception as e:  # the caller's error, not the step loop's
            done.set_exception(e)

    def _add(
        self,
        request_id: str,
        prompt: TokenizedPrompt,
        params: SamplingParams | BeamSearchParams,
        arrival_time: float,
        added: concurrent.futures.Future[None],
    ) -> None:
        try:
            if not added.set_running_or_notify_cancel():  # the caller gave up while this was queued
                with self._lock:
                    self._streams.pop(request_id, None)
                return
            try:
                self.engine.add_request(request_id, prompt, params, arrival_time=arrival_time)
            except Exception as e:
                with self._lock:
                    self._streams.pop(request_id, None)
                added.set_exception(e)
            else:
                added.set_result(None)
        finally:
            with self._lock:
                self._adds_in_flight -= 1
            self._publish_stats()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, finished: bool) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None) if finished else self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, error: EngineStepError) -> None:
        with self._lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            try:
                self.engine.abort_request(request_id)
            except Exception:  # the state may be what broke; the stream still gets its error
                logger.exception("ember: abort of %s failed", request_id)
            self._deliver(request_id, error, finished=True)

    def _publish_stats(self) -> None:
        engine = self.engine
        kv = engine.kv_manager
        self.stats = EngineStats(
            num_running=len(engine.scheduler.running),
            num_waiting=len(engine.scheduler.waiting),
            kv_cache_usage=kv.usage,
            kv_blocks_used=kv.num_total_blocks - kv.num_free_blocks,
            prefix_cache_queries=kv.stats.queries,
            prefix_cache_hits=kv.stats.hits,
            num_preemptions=engine.scheduler.num_preemptions,
            num_steps=self.stats.num_steps + 1,
            spec_decode=dataclasses.replace(engine.scheduler.spec_stats, accepted_per_position=list(
                engine.scheduler.spec_stats.accepted_per_position)),
        )
