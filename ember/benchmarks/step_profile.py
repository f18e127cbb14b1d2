"""Where each millisecond of an engine step goes: a phase timer around a live engine's parts.

`StepProfiler(engine)` is a context manager. While it is active, `engine.step` and the engine's scheduler, runner,
model and output processor are wrapped with timers (instance attributes shadowing their methods, and forward
hooks on the model's Linear and Attention modules); on exit everything is restored, so an engine that is not
being profiled pays nothing. Every step run meanwhile (by `LLM.generate` or any loop) is recorded:

- schedule, update, outputs: the scheduler and output processor (Python);
- inputs: the runner's persistent-batch update and input flattening (Python);
- weights: every Linear of the model but the LM head (the matmuls, quantized or not);
- attention: Attention modules without their projections (rotary, QK-norm, KV write, the attention kernel);
- forward other: the rest of the model's forward (embedding rows, norms, activations, residual adds);
- lm head: compute_logits; sampler: the sampler call; drafting: the proposer after the step;
- runner other: the rest of `ModelRunner.execute` (block copies, verification, bookkeeping).

Every phase is a measured interval or the remainder of one, and the top-level phases cover `engine.step()`;
what is left (`unaccounted`) is the time between the calls. The hooks cost ~1-2 us per module call, which the
report shows by also giving the step time measured without the profiler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.engine.scheduler import SchedulerOutput
from ember.models.layers.attention import Attention
from ember.models.layers.linear import Linear, VocabEmbedding

# (key, label), in report order. The last one is derived: step time minus the top-level phases.
PHASES = (
    ("schedule", "scheduler (Python)"),
    ("inputs", "input preparation (Python)"),
    ("weights", "matmuls over weights"),
    ("attention", "attention (rotary, KV write, kernel)"),
    ("forward_other", "other forward ops (norms, activations, residuals)"),
    ("lm_head", "LM head"),
    ("sampler", "sampler"),
    ("drafting", "drafting (speculation)"),
    ("runner_other", "runner other (copies, verification)"),
    ("update", "update_from_output (Python)"),
    ("outputs", "output processing (Python)"),
    ("unaccounted", "between the calls"),
)


@dataclass
class StepRecord:
    kind: str  # "decode" (every sequence computes its next token and drafts) or "prefill" (any prompt chunk)
    seconds: float
    phases: dict[str, float]  # seconds per phase key
    scheduled: SchedulerOutput


def step_kind(scheduled: SchedulerOutput) -> str:
    decode = all(item.num_new_tokens == len(item.spec_token_ids) + 1 for item in scheduled.scheduled)
    return "decode" if decode else "prefill"


class _TimedCall:
    """Forwards attribute access to `target` and times its calls (for objects called through __call__)."""

    def __init__(self, target: Any, record: Callable[[float], None]) -> None:
        self._target, self._record = target, record

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._target(*args, **kwargs)
        finally:
            self._record(time.perf_counter() - start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


@dataclass
class _Clock:
    phases: dict[str, float] = field(default_factory=dict)
    attention_depth: int = 0
    linear_in_attention: float = 0.0
    # Inside drafting: a layer-skip draft runs the model's own modules, whose time is the drafting phase's.
    suspended: int = 0

    def add(self, key: str, seconds: float) -> None:
        if not self.suspended:
            self.phases[key] = self.phases.get(key, 0.0) + seconds


class StepProfiler:
    """Records every `engine.step()` while active. `detailed=False` times only whole steps (and their kind):
    one wrapper per step, for the timed runs a detailed profile is compared with."""

    def __init__(self, engine: Any, detailed: bool = True) -> None:
        self.engine = engine
        self.detailed = detailed
        self.records: list[StepRecord] = []
        self._clock = _Clock()
        self._restore: list[Callable[[], None]] = []
        self._last_scheduled: SchedulerOutput | None = None

    # -- install / remove ---------------------------------------------------------------------------

    def __enter__(self) -> StepProfiler:
        engine, runner = self.engine, self.engine.runner
        model = runner.model
        step = engine.step
        engine.step = lambda: self._recorded_step(step)
        self._restore.append(lambda: delattr(engine, "step"))
        self._wrap(engine.scheduler, "schedule", "schedule", keep_result=True)
        if not self.detailed:
            return self
        self._wrap(engine.scheduler, "update_from_output", "update")
        self._wrap(engine.output_processor, "process", "outputs")
        self._wrap(runner, "execute", "runner")
        self._wrap(runner, "_update_states", "inputs")
        self._wrap(runner, "_prepare", "inputs")
        self._wrap(runner, "_propose", "drafting", suspends=True)
        self._wrap(model, "compute_logits", "lm_head")
        sampler = runner.sampler
        runner.sampler = _TimedCall(sampler, lambda s: self._clock.add("sampler", s))
        self._restore.append(lambda: setattr(runner, "sampler", sampler))
        self._hook(model, "forward")
        head = getattr(model, "lm_head", None)
        for module in model.modules():
            if isinstance(module, Attention):
                self._hook_attention(module)
            elif isinstance(module, Linear) and not isinstance(module, VocabEmbedding) and module is not head:
                self._hook_linear(module)
        return self

    def __exit__(self, *exc: object) -> None:
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()

    def _wrap(self, owner: Any, name: str, key: str, keep_result: bool = False, suspends: bool = False) -> None:
        method = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._clock.suspended += suspends
            try:
                result = method(*args, **kwargs)
            finally:
                self._clock.suspended -= suspends
                self._clock.add(key, time.perf_counter() - start)
            if keep_result:
                self._last_scheduled = result
            return result

        setattr(owner, name, timed)  # an instance attribute shadows the method until restored
        self._restore.append(lambda: delattr(owner, name))

    def _timed_hooks(self, module: torch.nn.Module, on_end: Callable[[float], None]) -> None:
        starts: list[float] = []

        def pre(*_: Any) -> None:
            starts.append(time.perf_counter())

        def post(*_: Any) -> None:
            on_end(time.perf_counter() - starts.pop())

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._restore.extend(h.remove for h in handles)

    def _hook(self, module: torch.nn.Module, key: str) -> None:
        self._timed_hooks(module, lambda s: self._clock.add(key, s))

    def _hook_linear(self, module: Linear) -> None:
        def done(seconds: float) -> None:
            self._clock.add("weights", seconds)
            if self._clock.attention_depth and not self._clock.suspended:
                self._clock.linear_in_attention += seconds

        self._timed_hooks(module, done)

    def _hook_attention(self, module: Attention) -> None:
        starts: list[float] = []

        def pre(*_: Any) -> None:
            self._clock.attention_depth += 1
            self._clock.linear_in_attention = 0.0
            starts.append(time.perf_counter())

        def post(*_: Any) -> None:
            self._clock.attention_depth -= 1
            self._clock.add("attention", time.perf_counter() - starts.pop() - self._clock.linear_in_attention)

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._restore.extend(h.remove for h in handles)

    # -- stepping ------------------------------------------------------------------------------------

    def _recorded_step(self, step: Callable[[], list[Any]]) -> list[Any]:
        """`engine.step()`, timed phase by phase (only as a whole when not detailed)."""
        self._clock = _Clock()
        self._last_scheduled = None
        start = time.perf_counter()
        outputs = step()
        seconds = time.perf_counter() - start
        scheduled = self._last_scheduled
        if scheduled is None or scheduled.is_empty():
            return outputs
        p = self._clock.phases
        if self.detailed:
            forward = p.pop("forward", 0.0)
            runner = p.pop("runner", 0.0)
            p["forward_other"] = forward - p.get("weights", 0.0) - p.get("attention", 0.0)
            inner = ("inputs", "weights", "attention", "forward_other", "lm_head", "sampler", "drafting")
            p["runner_other"] = runner - sum(p.get(k, 0.0) for k in inner)
            top = p.get("schedule", 0.0) + runner + p.get("update", 0.0) + p.get("outputs", 0.0)
            p["unaccounted"] = seconds - top
        self.records.append(StepRecord(step_kind(scheduled), seconds, dict(p), scheduled))
        return outputs

    def mean_step_ms(self) -> dict[str, float]:
        """Per step kind, the mean step time of the recorded steps."""
        means = {}
        for kind in ("prefill", "decode"):
            seconds = [r.seconds for r in self.records if r.kind == kind]
            if seconds:
                means[kind] = sum(seconds) / len(seconds) * 1e3
        return means
