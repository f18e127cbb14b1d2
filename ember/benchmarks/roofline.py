"""Roofline report of profiled engine steps: where each phase stands against the machine's ceilings.

For each kind of step (decode, prefill) the report gives the mean time of every phase (StepProfiler), and for
the three phases that move the model's bytes and FLOPs — the weight matmuls, attention and the LM head —
what they read and computed per step, counted from the model and the step's shape (not measured):

- weights: every non-head Linear's stored bytes (codes and scales as the kernels read them) once per step;
  2 x (in x out) FLOPs per computed token;
- attention: each sequence's visible keys and values (KV cache bytes, scales included) once per layer and
  step; 4 x heads x head_dim FLOPs per (query, visible key) pair, sliding windows applied;
- LM head: the head's (or tied embedding's) bytes; 2 x hidden x vocab FLOPs per logits row.

Achieved GB/s and GFLOP/s divide those by the phase's time; each is also a share of its ceiling
(ember.benchmarks.ceilings). At batch 1 a decode step should sit near the bandwidth roof, at large batches
the matmuls move toward the compute roof. `plot` draws the roofline with the run's points (matplotlib).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ember.benchmarks.ceilings import Ceilings
from ember.benchmarks.step_profile import PHASES, StepRecord
from ember.engine.scheduler import SchedulerOutput
from ember.models.layers.linear import Linear, VocabEmbedding

COSTED_PHASES = ("weights", "attention", "lm_head")


@dataclass(frozen=True)
class ModelCost:
    """What one step of this model reads and computes, as a function of the step's shape."""

    linear_elements: int  # sum of in x out over the non-head Linears
    linear_bytes: int
    head_elements: int
    head_bytes: int
    num_heads: int
    head_dim: int
    kv_bytes_per_token: tuple[int, ...]  # per layer: one position's keys and values (with scales)
    windows: tuple[int | None, ...]  # per layer: sliding window, None for full attention

    @classmethod
    def of_engine(cls, engine: Any) -> ModelCost:
        model, cache, config = engine.runner.model, engine.runner.kv_cache, engine.model_config
        head = model.lm_head if model.lm_head is not None else model.model.embed_tokens
        linears = [m for m in model.modules() if isinstance(m, Linear) and not isinstance(m, VocabEmbedding) and m is not head]
        kv_bytes = []
        for layer in range(config.num_hidden_layers):
            tensors = [cache.keys[layer], cache.values[layer], cache.key_scales[layer], cache.value_scales[layer]]
            kv_bytes.append(sum(t[0, 0].numel() * t.element_size() for t in tensors if t is not None))
        return cls(
            linear_elements=sum(m.in_features * m.out_features for m in linears),
            linear_bytes=sum(m.method.weight_bytes(m) for m in linears),
            head_elements=head.in_features * head.out_features,
            head_bytes=head.method.weight_bytes(head),
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            kv_bytes_per_token=tuple(kv_bytes),
            windows=tuple(config.sliding_window if config.is_sliding(i) else None for i in range(config.num_hidden_layers)),
        )

    def step(self, scheduled: SchedulerOutput) -> dict[str, tuple[float, float]]:
        """Per costed phase, (bytes read, FLOPs) of one step (n > 1 siblings share their parent's logits row)."""
        tokens = sum(item.num_new_tokens for item in scheduled.scheduled)
        rows = sum(len(item.spec_token_ids) + 1 for item in scheduled.scheduled if item.samples)
        kv_bytes = pairs = 0.0
        for window, per_token in zip(self.windows, self.kv_bytes_per_token):
            for item in scheduled.scheduled:
                end = item.num_computed_tokens + item.num_new_tokens
                kv_bytes += min(end, window or end) * per_token
                pairs += visible_pairs(item.num_computed_tokens, item.num_new_tokens, window)
        return {
            "weights": (float(self.linear_bytes), 2.0 * self.linear_elements * tokens),
            "attention": (kv_bytes, 4.0 * self.num_heads * self.head_dim * pairs),
            "lm_head": (float(self.head_bytes), 2.0 * self.head_elements * rows),
        }


def visible_pairs(start: int, count: int, window: int | None) -> int:
    """Sum over the queries at positions [start, start + count) of the keys each sees: min(p + 1, window)."""
    first, last = start + 1, start + count  # each query's visible count before the window applies
    if window is None or last <= window:
        return (first + last) * count // 2
    if first > window:
        return window * count
    return (first + window) * (window - first + 1) // 2 + window * (last - window)


@dataclass
class PhaseFigures:
    key: str
    label: str
    ms: float  # mean per step
    share: float  # of the step time
    bytes: float | None = None  # per step
    flops: float | None = None
    gbs: float | None = None
    gflops: float | None = None
    bandwidth_use: float | None = None  # of the read ceiling
    compute_use: float | None = None  # of the matmul peak


@dataclass
class StepFigures:
    kind: str
    steps: int
    step_ms: float  # mean, under the profiler
    tokens_per_step: float
    phases: list[PhaseFigures]
    total_gbs: float
    total_gflops: float


@dataclass
class RooflineReport:
    ceilings: Ceilings
    compute_dtype: str
    unprofiled_step_ms: dict[str, float]  # per kind, from the timed run without the profiler
    kinds: list[StepFigures]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_report(
    records: Sequence[StepRecord], cost: ModelCost, ceilings: Ceilings, compute_dtype: torch.dtype,
    unprofiled_step_ms: dict[str, float] | None = None,
) -> RooflineReport:
    peak = ceilings.peak_gflops(compute_dtype)
    kinds = []
    for kind in ("prefill", "decode"):
        chosen = [r for r in records if r.kind == kind]
        if not chosen:
            continue
        step_s = sum(r.seconds for r in chosen) / len(chosen)
        costs = [cost.step(r.scheduled) for r in chosen]
        phases = []
        total_bytes = total_flops = 0.0
        for key, label in PHASES:
            seconds = sum(r.phases.get(key, 0.0) for r in chosen) / len(chosen)
            figures = PhaseFigures(key, label, seconds * 1e3, seconds / step_s)
            if key in COSTED_PHASES:
                figures.bytes = sum(c[key][0] for c in costs) / len(chosen)
                figures.flops = sum(c[key][1] for c in costs) / len(chosen)
                total_bytes += figures.bytes
                total_flops += figures.flops
                if seconds > 0:
                    figures.gbs = figures.bytes / seconds / 1e9
                    figures.gflops = figures.flops / seconds / 1e9
                    figures.bandwidth_use = figures.gbs / ceilings.read_gbs
                    figures.compute_use = figures.gflops / peak
            phases.append(figures)
        tokens = sum(sum(i.num_new_tokens for i in r.scheduled.scheduled) for r in chosen) / len(chosen)
        kinds.append(StepFigures(kind, len(chosen), step_s * 1e3, tokens, phases,
                                 total_bytes / step_s / 1e9, total_flops / step_s / 1e9))  # fmt: skip
    name = str(compute_dtype).removeprefix("torch.")
    return RooflineReport(ceilings, name, dict(unprofiled_step_ms or {}), kinds)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "" if value is None else f"{value / scale:.{digits}f}"


def report_table(report: RooflineReport) -> str:
    c = report.ceilings
    peaks = ", ".join(f"{name} {value:.0f}" for name, value in c.matmul_gflops.items())
    lines = [
        f"Roofline. Ceilings of {c.machine} (measured {c.measured_at}): read {c.read_gbs:.1f} GB/s; "
        f"matmul peak GFLOP/s: {peaks} (compute dtype {report.compute_dtype})"
    ]
    for figures in report.kinds:
        plain = report.unprofiled_step_ms.get(figures.kind)
        plain_text = f"; {plain:.2f} ms without the profiler" if plain is not None else ""
        lines += [
            "",
            f"{figures.kind}: {figures.steps} steps, {figures.tokens_per_step:.1f} tokens per step, "
            f"{figures.step_ms:.2f} ms per step under the profiler{plain_text}; whole step "
            f"{figures.total_gbs:.1f} GB/s, {figures.total_gflops:.1f} GFLOP/s",
            "| phase | ms | share | MB read | GFLOP | GB/s | % of read ceiling | GFLOP/s | % of matmul peak |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        above = [p.label for p in figures.phases if max(p.bandwidth_use or 0, p.compute_use or 0) > 1]
        if above:
            lines.insert(-2, f"above a measured ceiling: {', '.join(above)} (data served from the caches, or ceilings "
                             "measured under load: --remeasure-ceilings)")  # fmt: skip
        for p in figures.phases:
            lines.append(
                f"| {p.label} | {p.ms:.3f} | {_percent(p.share)} | {_number(p.bytes, 1e6)} | {_number(p.flops, 1e9, 3)} "
                f"| {_number(p.gbs)} | {_percent(p.bandwidth_use)} | {_number(p.gflops)} | {_percent(p.compute_use)} |"
            )
    return "\n".join(lines)


def plot(report: RooflineReport, path: str) -> None:
    """A log-log roofline (GFLOP/s against FLOPs per byte read) with each costed phase and whole step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from ember.errors import EmberError

        raise EmberError("--plot needs matplotlib: pip install 'ember[bench]'") from e
    c = report.ceilings
    figure, axes = plt.subplots(figsize=(7, 5))
    intensity = [2.0**e for e in range(-6, 11)]
    for name, peak in c.matmul_gflops.items():
        axes.plot(intensity, [min(peak, c.read_gbs * x) for x in intensity], label=f"roof: {name} matmul, {c.read_gbs:.0f} GB/s")
    markers = {"weights": "o", "attention": "s", "lm_head": "^", "step": "*"}
    for figures in report.kinds:
        points = [(p.key, p.flops, p.bytes, p.gflops) for p in figures.phases if p.gflops]
        if figures.total_gbs > 0:
            points.append(("step", figures.total_gflops, figures.total_gbs, figures.total_gflops))
        for key, flops, read, gflops in points:
            axes.scatter([flops / read], [gflops], marker=markers[key], s=60, label=f"{figures.kind}: {key}")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("arithmetic intensity (FLOP per byte read)")
    axes.set_ylabel("GFLOP/s")
    axes.set_title("ember roofline")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
