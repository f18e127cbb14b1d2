"""What a scaling strategy spent: tokens, engine steps, KV blocks, scorer calls and time.

`Meter` watches one strategy run on an engine: it snapshots the engine's counters when the run starts and
reads the KV pool after every step; `Meter.finish` turns that into an `Accounting`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ember.engine.llm_engine import LLMEngine
from ember.outputs import CompletionOutput

ABORTED = "abort"  # CompletionOutput.finish_reason of a sample an early stop cut short


@dataclass
class Accounting:
    num_samples: int
    """Completions asked for (N, or k of short-m@k)."""
    num_finished: int
    """Completions that ended on their own (a stop or the length limit)."""
    num_aborted: int
    """Completions an early stop cut short."""
    generated_tokens: int
    """Tokens sampled over all completions, the aborted ones' included (= sum of their lengths)."""
    aborted_tokens: int
    """Of those, tokens of the aborted completions."""
    prompt_tokens: int
    """Length of the prompt, which the n completions share (computed once, then forked)."""
    lookup_tokens: int
    """Tokens looked up in the prefix cache when the request was admitted (the prompt; again, with the
    outputs so far, after a preemption)."""
    cached_tokens: int
    """Of those, tokens found in the prefix cache and not computed."""
    engine_steps: int
    """Engine steps the strategy ran."""
    peak_kv_blocks: int
    """Most KV blocks in use after any step, summed over the layer groups (read after each step: blocks of a
    sequence that finishes within a step are already back)."""
    preemptions: int
    """Sequences the scheduler preempted (and later recomputed) during the run."""
    sampling_seconds: float
    """Wall time from adding the request to its last step (or abort)."""
    scorer_calls: int = 0
    """Completions handed to a scorer, verifier or reward model."""
    scoring_seconds: float = 0.0
    """Wall time spent scoring completions or extracting their answers."""

    @property
    def wall_seconds(self) -> float:
        return self.sampling_seconds + self.scoring_seconds

    @property
    def computed_prompt_tokens(self) -> int:
        return self.lookup_tokens - self.cached_tokens


class Meter:
    """Counts one strategy run; create it right before the run's request is added."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._stats = (engine.kv_manager.stats.queries, engine.kv_manager.stats.hits)
        self._preemptions = engine.scheduler.num_preemptions
        self._start = time.perf_counter()
        self.steps = 0
        self.peak_kv_blocks = self.kv_blocks_in_use()

    def kv_blocks_in_use(self) -> int:
        kv = self.engine.kv_manager
        return kv.num_total_blocks - kv.num_free_blocks

    def after_step(self) -> None:
        self.steps += 1
        self.peak_kv_blocks = max(self.peak_kv_blocks, self.kv_blocks_in_use())

    def finish(self, completions: list[CompletionOutput], prompt_tokens: int) -> Accounting:
        """The run's accounting once sampling is over (a strategy adds its scoring with `replace`)."""
        stats = self.engine.kv_manager.stats
        aborted = [c for c in completions if c.finish_reason == ABORTED]
        return Accounting(
            num_samples=len(completions),
            num_finished=len(completions) - len(aborted),
            num_aborted=len(aborted),
            generated_tokens=sum(len(c.token_ids) for c in completions),
            aborted_tokens=sum(len(c.token_ids) for c in aborted),
            prompt_tokens=prompt_tokens,
            lookup_tokens=stats.queries - self._stats[0],
            cached_tokens=stats.hits - self._stats[1],
            engine_steps=self.steps,
            peak_kv_blocks=self.peak_kv_blocks,
            preemptions=self.engine.scheduler.num_preemptions - self._preemptions,
            sampling_seconds=time.perf_counter() - self._start,
        )
