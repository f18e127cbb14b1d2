"""Scheduler policy without a model: fake requests, fake runner results."""

from __future__ import annotations

import torch

from ember.engine.block_manager import KVCacheManager
from ember.engine.request import FinishReason, Request, RequestStatus
from ember.engine.scheduler import Scheduler
from ember.sampling_params import SamplingParams

BS = 4


def _request(request_id: str, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(
        request_id=request_id, prompt=None, prompt_token_ids=[1000 * ord(request_id[0]) + i for i in range(prompt_len)],
        params=SamplingParams(max_tokens=max_tokens), max_total_len=prompt_len + max_tokens,
        generator=torch.Generator(), eos_token_ids=[], parent_id=request_id,
    )


def _scheduler(num_blocks: int = 64, budget: int = 16, max_seqs: int = 8, prefix_caching: bool = True) -> Scheduler:
    return Scheduler(KVCacheManager([(num_blocks + 1, None)], BS, prefix_caching), max_seqs, budget)


def _run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule, then play the runner: computed tokens advance, sampling rows get token 1."""
    out = scheduler.schedule()
    for item in out.scheduled:
        samples = item.samples
        item.request.num_computed_tokens += item.num_new_tokens
        if samples:
            item.request.output_token_ids.append(1)
    scheduler.after_step(out)
    return {item.request.request_id: item.num_new_tokens for item in out.scheduled}


def test_token_budget_and_chunk_boundaries():
    scheduler = _scheduler(budget=16)
    for name, length in (("a", 10), ("b", 20)):
        scheduler.add(_request(name, length))
    assert _run_step(scheduler) == {"a": 10, "b": 6}  # b's prompt is cut at the budget
    assert _run_step(scheduler) == {"a": 1, "b": 14}  # decode first, then the rest of b's prompt
    assert _run_step(scheduler) == {"a": 1, "b": 1}


def test_decode_first_then_fcfs_admission():
    scheduler = _scheduler(budget=8)
    scheduler.add(_request("a", 4))
    _run_step(scheduler)
    for name in ("b", "c"):
        scheduler.add(_request(name, 6))
    steps = _run_step(scheduler)
    assert list(steps) == ["a", "b", "c"] and steps == {"a": 1, "b": 6, "c": 1}


def test_max_num_seqs_limits_running():
    scheduler = _scheduler(budget=100, max_seqs=2)
    for name in "abc":
        scheduler.add(_request(name, 3))
    assert set(_run_step(scheduler)) == {"a", "b"}
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_preempts_the_most_recently_admitted():
    scheduler = _scheduler(num_blocks=6, budget=100)  # 24 token positions
    for name in "abc":
        scheduler.add(_request(name, 7, max_tokens=20))
    _run_step(scheduler)  # each holds 2 blocks
    while scheduler.num_preemptions == 0:
        _run_step(scheduler)
    assert scheduler.waiting[0].request_id == "c" and scheduler.waiting[0].status == RequestStatus.WAITING
    assert scheduler.waiting[0].num_computed_tokens == 0
    assert [r.request_id for r in scheduler.running] == ["a", "b"]


def test_preempted_request_resumes_with_its_outputs():
    scheduler = _scheduler(num_blocks=4, budget=100, prefix_caching=False)
    scheduler.add(_request("a", 6, max_tokens=20))
    scheduler.add(_request("b", 6, max_tokens=20))
    while scheduler.num_preemptions == 0:
        _run_step(scheduler)
    victim = scheduler.waiting[0]
    generated = len(victim.output_token_ids)
    for name in [r.request_id for r in scheduler.running]:
        scheduler.finish(next(r for r in scheduler.running if r.request_id == name), FinishReason.STOP)
    steps = _run_step(scheduler)
    assert steps[victim.request_id] == 6 + generated  # recomputes prompt and outputs in one go
    assert len(victim.output_token_ids) == generated + 1


def test_rejects_what_can_never_fit():
    kv = KVCacheManager([(11, None)], BS)  # 10 usable blocks = 40 tokens
    assert kv.can_ever_fit(40, chunk=16)
    assert not kv.can_ever_fit(41, chunk=16)
    sliding = KVCacheManager([(11, None), (6, 8)], BS)  # window 8 needs 3 blocks + a chunk
    assert sliding.can_ever_fit(40, chunk=8)
    assert not sliding.can_ever_fit(40, chunk=16)


def test_finish_returns_blocks():
    scheduler = _scheduler()
    scheduler.add(_request("a", 9))
    _run_step(scheduler)
    request = scheduler.running[0]
    scheduler.finish(request, FinishReason.ABORT)
    manager = scheduler.kv.managers[0]
    assert manager.num_free_blocks == manager.num_blocks and not scheduler.has_unfinished()
