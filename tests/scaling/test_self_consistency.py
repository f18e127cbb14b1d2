"""Self-consistency: the majority of the extracted answers, deterministic ties, no answer, early stops."""

from __future__ import annotations

import pytest

from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput
from ember.scaling import EarlyStop, ScorerError, majority_vote, regex_extractor, self_consistency
from helpers import assert_no_leak


def _completion(index: int, cumulative_logprob: float) -> CompletionOutput:
    return CompletionOutput(index=index, text="", token_ids=[1], cumulative_logprob=cumulative_logprob)


def test_votes_for_what_a_scripted_extractor_dictates(llm, prompt, short):
    # Answers scripted by the sampled text: "even"/"odd" by its length, so the expected tally follows from
    # the completions returned, whatever they are.
    def parity(text: str) -> str:
        return "even" if len(text) % 2 == 0 else "odd"

    vote = self_consistency(llm, prompt, 6, parity, short)
    answers = [parity(c.text) for c in vote.completions]
    assert vote.answers == answers
    counts = {a: answers.count(a) for a in answers}
    assert vote.tally.votes == counts
    best = max(counts.values())
    assert counts[vote.answer] == best and vote.vote_share == best / 6
    assert vote.supporting == [c for c, a in zip(vote.completions, answers) if a == vote.answer]
    assert vote.accounting.generated_tokens == sum(len(c.token_ids) for c in vote.completions)
    assert_no_leak(llm.engine)


def test_ties_go_to_the_higher_summed_logprob_then_the_first_seen():
    candidates = [_completion(i, lp) for i, lp in enumerate([-1.0, -9.0, -3.0, -2.0, -5.0])]
    tally = majority_vote(candidates, ["a", "b", "a", "b", None])
    assert tally.answer == "a" and tally.votes == {"a": 2, "b": 2}  # -4 beats -11
    assert tally.vote_share == 2 / 5  # the candidate without an answer counts in the share
    assert [c.index for c in tally.supporting] == [0, 2]
    even = [_completion(i, -1.0) for i in range(4)]
    assert majority_vote(even, ["x", "y", "y", "x"]).answer == "x"


def test_a_pattern_that_never_matches_gives_no_answer(llm, prompt, short):
    vote = self_consistency(llm, prompt, 3, r"The answer is (\d+)", short)
    assert vote.answer is None and vote.vote_share == 0.0 and vote.supporting == []
    assert vote.answers == [None] * 3
    assert "found no answer in any of the 3 candidates" in vote.tally.no_answer
    assert "The answer is" in vote.tally.no_answer


def test_regex_takes_the_last_match_and_its_group():
    extract = regex_extractor(r"Answer:\s*(-?\d+)")
    assert extract("Answer: 3, no wait. Answer:  -41\n") == "-41"
    assert regex_extractor(r"\d+")("a 12 b 7") == "7"
    assert extract("nothing") is None


def test_short_m_at_k_votes_among_the_first_m(llm, prompt, params):
    vote = self_consistency(llm, prompt, 6, lambda text: "same", params, early_stop=EarlyStop(3))
    assert len(vote.candidates) == len(vote.answers) == 3 and vote.answer == "same" and vote.vote_share == 1.0
    assert all(c.finish_reason == "stop" for c in vote.candidates)
    assert vote.accounting.num_aborted == 3
    assert_no_leak(llm.engine)


def test_bad_extractors(llm, prompt, short):
    with pytest.raises(InvalidRequestError, match="not a valid regular expression"):
        self_consistency(llm, prompt, 2, r"(unclosed", short)
    assert_no_leak(llm.engine)

    def broken(text: str) -> str:
        raise ValueError("cannot parse")

    with pytest.raises(ScorerError, match="answer extractor broken on completion 0 raised ValueError: cannot parse"):
        self_consistency(llm, prompt, 2, broken, short)
    with pytest.raises(ScorerError, match="an answer must be a string or None"):
        self_consistency(llm, prompt, 2, lambda text: 42, short)
    assert_no_leak(llm.engine)
