"""Scheduler policy without a model: fake requests, fake runner results through update_from_output."""

from __future__ import annotations

from collections.abc import Callable

from ember.engine.block_manager import KVCacheManager
from ember.engine.request import FinishReason, Request, RequestStatus
from ember.engine.scheduler import ScheduledRequest, Scheduler
from ember.sampling_params import SamplingParams
from ember.worker.runner_output import ModelRunnerOutput

BS = 4


def _request(request_id: str, prompt_len: int, max_tokens: int = 8, eos: int | None = None) -> Request:
    return Request(
        request_id=request_id, prompt=None, prompt_token_ids=[1000 * ord(request_id[0]) + i for i in range(prompt_len)],
        params=SamplingParams(max_tokens=max_tokens), max_total_len=prompt_len + max_tokens,
        seed=0, eos_token_ids=[] if eos is None else [eos], parent_id=request_id,
    )


# A fake runner: given a scheduled request, the tokens it "sampled" (accepted drafts + one) and new drafts.
FakeRunner = Callable[[ScheduledRequest], tuple[list[int], list[int]]]


def _one_token(item: ScheduledRequest) -> tuple[list[int], list[int]]:
    return [1], []


def _scheduler(num_blocks: int = 64, budget: int = 16, max_seqs: int = 8, prefix_caching: bool = True) -> Scheduler:
    return Scheduler(KVCacheManager([(num_blocks + 1, None)], BS, prefix_caching), max_seqs, budget)


def _run_step(scheduler: Scheduler, runner: FakeRunner = _one_token) -> dict[str, int]:
    """Schedule, play the runner, apply its output the way the engine does."""
    out = scheduler.schedule()
    result = ModelRunnerOutput()
    for item in out.scheduled:
        if item.samples:
            result.add_row(item.request_id, *_with_logprobs(runner(item)))
    scheduler.update_from_output(out, result)
    return {item.request_id: item.num_new_tokens for item in out.scheduled}


def _with_logprobs(sampled: tuple[list[int], list[int]]) -> tuple[list[int], None, list[int]]:
    tokens, drafts = sampled
    return tokens, None, drafts


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


def _drafting_runner(accept: int, k: int = 3) -> FakeRunner:
    """Proposes k drafts (tokens 7, 8, 9...); at verification accepts the first `accept` of them."""

    def run(item: ScheduledRequest) -> tuple[list[int], list[int]]:
        drafts = item.spec_token_ids
        return drafts[:accept] + [5], [7 + i for i in range(k)]

    return run


def test_drafts_are_scheduled_counted_and_rolled_back():
    scheduler = _scheduler(budget=64)
    request = _request("a", 6, max_tokens=20)
    scheduler.add(request)
    assert _run_step(scheduler, _drafting_runner(accept=1)) == {"a": 6}  # prefill; 3 drafts proposed
    assert request.spec_token_ids == [7, 8, 9]
    assert _run_step(scheduler, _drafting_runner(accept=1)) == {"a": 4}  # the new token + 3 drafts
    # Accepted: draft 7, then the sampled 5. The 2 rejected positions are not computed.
    assert request.output_token_ids == [5, 7, 5]
    assert request.num_computed_tokens == request.num_tokens - 1 == 8
    assert len(scheduler.kv.managers[0].tables["a"].block_ids) == 3  # as without drafts: positions 0..8
    assert scheduler.spec_stats.num_drafts == 1 and scheduler.spec_stats.num_accepted_tokens == 1
    assert scheduler.spec_stats.accepted_per_position == [1, 0, 0]


def test_only_verified_blocks_enter_the_prefix_cache():
    scheduler = _scheduler(budget=64)
    request = _request("a", 3, max_tokens=20)  # prefill 3, then token at position 3 ends block 0
    scheduler.add(request)
    _run_step(scheduler, _drafting_runner(accept=0, k=3))
    _run_step(scheduler, _drafting_runner(accept=0, k=3))  # computes positions 3..6; only position 3 is kept
    manager = scheduler.kv.managers[0]
    assert request.num_computed_tokens == 4 and request.num_tokens == 5
    table = manager.tables["a"]
    assert manager.blocks[table.block_ids[0]].block_hash is not None  # positions 0..3: all verified
    assert all(manager.blocks[b].block_hash is None for b in table.block_ids[1:])  # holds draft positions


def test_stop_token_inside_accepted_drafts_ends_there():
    scheduler = _scheduler(budget=64)
    request = _request("a", 4, max_tokens=20, eos=8)
    scheduler.add(request)
    _run_step(scheduler, _drafting_runner(accept=3))
    _run_step(scheduler, _drafting_runner(accept=3))  # accepts 7, 8 (eos), 9: stops at 8
    assert request.output_token_ids == [5, 7, 8] and request.finish_reason == FinishReason.STOP
    assert not scheduler.has_unfinished() and scheduler.kv.managers[0].num_free_blocks == scheduler.kv.managers[0].num_blocks


def test_drafts_never_pass_max_tokens():
    scheduler = _scheduler(budget=64)
    request = _request("a", 4, max_tokens=3)
    scheduler.add(request)
    _run_step(scheduler, _drafting_runner(accept=3))
    assert request.spec_token_ids == [7, 8]  # 1 token so far: 2 drafts reach the last position
    _run_step(scheduler, _drafting_runner(accept=3))
    assert request.output_token_ids == [5, 7, 8] and request.finish_reason == FinishReason.LENGTH


def test_budget_cuts_drafts_first():
    scheduler = _scheduler(budget=3)
    request = _request("a", 3, max_tokens=20)
    scheduler.add(request)
    _run_step(scheduler, _drafting_runner(accept=3))
    out = scheduler.schedule()
    [item] = out.scheduled
    assert item.num_new_tokens == 3 and item.spec_token_ids == [7, 8] and item.samples


def test_speculation_backs_off_after_rejections():
    scheduler = _scheduler(budget=64)
    request = _request("a", 4, max_tokens=40)
    scheduler.add(request)
    widths = [_run_step(scheduler, _drafting_runner(accept=0, k=2))["a"] for _ in range(10)]
    # prefill, then: drafts (3 wide) rejected, skip 1 step, drafts rejected, skip 2, drafts rejected, skip 4
    assert widths == [4, 3, 1, 3, 1, 1, 3, 1, 1, 1]
    _run_step(scheduler, _drafting_runner(accept=0, k=2))
    assert _run_step(scheduler, _drafting_runner(accept=1, k=2))["a"] == 3
    assert request.spec_backoff == 0  # an accepted token resets the back-off


def test_lookahead_slots_for_a_model_drafter():
    """A draft model writes KV past the verified tokens: the scheduler allocates `num_lookahead_tokens`
    slots past each sampling chunk (never past the request's last position) and keeps them on rollback."""
    scheduler = Scheduler(KVCacheManager([(65, None)], BS), 8, 64, num_lookahead_tokens=3)
    request = _request("a", 6, max_tokens=20)
    scheduler.add(request)
    _run_step(scheduler, _drafting_runner(accept=1))  # prefill 6 (+3 lookahead: positions 0..8)
    table = scheduler.kv.managers[0].tables["a"]
    assert len(table.block_ids) == 3
    _run_step(scheduler, _drafting_runner(accept=1))  # positions 6..9 computed, 10..12 ahead
    assert request.num_computed_tokens == 8 and request.num_tokens == 9
    assert len(table.block_ids) == 3  # rolled back to 9 tokens + 3 ahead = positions 0..11
    short = _request("b", 4, max_tokens=2)
    scheduler.add(short)
    _run_step(scheduler, _drafting_runner(accept=1))
    assert len(scheduler.kv.managers[0].tables["b"].block_ids) == 2  # 4 + 3 capped at its last position (6)


def test_a_fork_shares_only_the_prompt_blocks():
    """Slots allocated ahead for the parent are not the child's: it gets the prompt's blocks, the
    partly filled one copied."""
    scheduler = Scheduler(KVCacheManager([(65, None)], BS), 8, 64, num_lookahead_tokens=4)
    parent = _request("a", 6, max_tokens=10)
    child = _request("b", 6, max_tokens=10)
    child.prompt_token_ids = parent.prompt_token_ids
    parent.pending_forks = [child]
    scheduler.add(parent)
    out = scheduler.schedule()
    result = ModelRunnerOutput()
    result.add_row("a", [5], None, [])
    result.add_row("b", [6], None, [])
    scheduler.update_from_output(out, result)
    manager = scheduler.kv.managers[0]
    parent_blocks, child_blocks = manager.tables["a"].block_ids, manager.tables["b"].block_ids
    assert len(parent_blocks) == 3 and len(child_blocks) == 2  # parent: 6 + 4 ahead; child: the prompt
    assert child_blocks[0] == parent_blocks[0] and child_blocks[1] != parent_blocks[1]
    assert scheduler.schedule().block_copies == [(0, parent_blocks[1], child_blocks[1])]
