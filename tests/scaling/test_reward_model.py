"""A reward model served by ember scores by log-probabilities read off its prompt, matching a direct forward."""

from __future__ import annotations

import math

import pytest
import torch

from ember import LLM
from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput
from ember.scaling import RewardModel, best_of_n
from helpers import assert_no_leak, batch_logits

TEMPLATE = "Question: {prompt}\nAnswer: {completion}\nCorrect?"


@pytest.fixture(scope="module")
def judge(checkpoint_dir) -> LLM:
    return LLM(checkpoint_dir("qwen2"), dtype="float32", max_model_len=128, enable_prefix_caching=False)


def _direct_mean_logprob(llm: LLM, context: list[int], tail: list[int]) -> float:
    [logits] = batch_logits(llm.engine.runner.model, [context + tail])
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    positions = range(len(context) - 1, len(context) + len(tail) - 1)
    return sum(logprobs[p, t].item() for p, t in zip(positions, tail)) / len(tail)


def test_verdict_and_likelihood_scores_match_a_direct_forward(judge):
    tokenizer = judge.get_tokenizer()
    completions = [CompletionOutput(index=i, text=t, token_ids=[]) for i, t in enumerate(["add the numbers", "def f"])]
    verdict = RewardModel(judge, TEMPLATE, verdict=" yes")
    likelihood = RewardModel(judge, "Question: {prompt}\nAnswer:{completion}")
    verdict_scores = verdict.score_batch("2 + 3", completions)
    likelihood_scores = likelihood.score_batch("2 + 3", completions)
    for c, v, lk in zip(completions, verdict_scores, likelihood_scores):
        context = tokenizer.encode(TEMPLATE.format(prompt="2 + 3", completion=c.text))
        assert v == pytest.approx(_direct_mean_logprob(judge, context, tokenizer.encode(" yes", False)), abs=1e-4)
        context = tokenizer.encode("Question: 2 + 3\nAnswer:")
        assert lk == pytest.approx(_direct_mean_logprob(judge, context, tokenizer.encode(c.text, False)), abs=1e-4)
    assert verdict("2 + 3", completions[1]) == pytest.approx(verdict_scores[1], abs=1e-4)
    assert_no_leak(judge.engine)


def test_best_of_n_by_a_reward_model(llm, judge, prompt, short):
    reward = RewardModel(judge, TEMPLATE, verdict=" yes")
    result = best_of_n(llm, prompt, 3, short, scorer=reward)
    assert result.accounting.scorer_calls == 3
    assert all(math.isfinite(s) and s < 0 for s in result.scores)
    assert result.score == max(result.scores)
    assert_no_leak(llm.engine)
    assert_no_leak(judge.engine)


def test_an_empty_completion_scores_minus_infinity(judge):
    scores = RewardModel(judge).score_batch("hello", [CompletionOutput(index=0, text="", token_ids=[2])])
    assert scores == [-math.inf]


def test_bad_reward_models(llm, judge):
    with pytest.raises(InvalidRequestError, match="enable_prefix_caching=False"):
        RewardModel(llm)
    with pytest.raises(InvalidRequestError, match=r"only \{prompt\} and \{completion\}"):
        RewardModel(judge, "{question}")
    with pytest.raises(InvalidRequestError, match="non-empty"):
        RewardModel(judge, verdict="")
