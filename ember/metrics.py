"""Prometheus metrics of a serving engine, named after vLLM's with an `ember:` prefix.

Latencies and token counts are recorded by the server as requests finish; the engine's own state
(queue lengths, KV usage, prefix-cache and preemption counts) is read from the step loop's latest
`EngineStats` snapshot when /metrics is scraped. Every instance has its own registry (no global state),
so several servers or tests in one process don't collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ember.engine.async_engine import EngineStats
from ember.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineStatsCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        spec = s.spec_decode
        yield from self._families(GaugeMetricFamily, (
            ("num_requests_running", "Requests in the running batch.", s.num_running),
            ("num_requests_waiting", "Requests waiting to be admitted (incl. preempted ones).", s.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.kv_cache_usage),
            ("kv_cache_blocks_used", "KV-cache blocks held by requests.", s.kv_blocks_used),
        ))
        yield from self._families(CounterMetricFamily, (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            ("num_preemptions", "Requests preempted (their KV cache dropped, recomputed later).", s.num_preemptions),
            # vLLM's speculative-decoding counters (zero when speculation is off).
            ("spec_decode_num_drafts", "Verification steps of requests with draft tokens.", spec.num_drafts),
            ("spec_decode_num_draft_tokens", "Draft tokens verified.", spec.num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens),
        ))
        per_position = CounterMetricFamily(
            "ember:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by draft position.",
            labels=["model_name", "position"],
        )
        for position, value in enumerate(spec.accepted_per_position):
            per_position.add_metric([self._model, str(position)], value)
        yield per_position

    def _families(self, kind: type, items: tuple[tuple[str, str, float], ...]) -> Iterator[Metric]:
        for name, doc, value in items:
            family = kind(f"ember:{name}", doc, labels=["model_name"])
            family.add_metric([self._model], value)
            yield family


class ServingMetrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"ember:{name}", doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.", _LATENCY_BUCKETS)
        self.tpot = histogram(
            "time_per_output_token_seconds", "Mean time per output token after the first, per request.",
            _TOKEN_LATENCY_BUCKETS,
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", _LATENCY_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival until first admitted into the batch.", _LATENCY_BUCKETS
        )
        self.prompt_tokens = Counter("ember:prompt_tokens", "Prompt tokens processed.", labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter(
            "ember:generation_tokens", "Tokens generated.", labels, registry=reg
        ).labels(model_name)
        self.request_success = Counter(
            "ember:request_success", "Requests finished, by finish reason.", labels + ["finished_reason"], registry=reg
        )
        reg.register(_EngineStatsCollector(stats, model_name))

    def record(self, output: RequestOutput) -> None:
        """Count a request once it has ended (finished, or the last output seen before an abort)."""
        generated = sum(len(c.token_ids) for c in output.outputs)
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(generated)
        if output.finished:
            for completion in output.outputs:
                self.request_success.labels(self.model_name, completion.finish_reason or "abort").inc()
        m = output.metrics
        if m is None:
            return
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            if m.finished_time is not None:
                self.e2e.observe(m.finished_time - m.arrival_time)
                per_sequence = max(len(c.token_ids) for c in output.outputs)
                if per_sequence > 1:
                    self.tpot.observe((m.finished_time - m.first_token_time) / (per_sequence - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
