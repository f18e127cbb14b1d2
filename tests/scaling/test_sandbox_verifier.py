"""The sandboxed code verifier: right code passes, wrong code fails, runaway code is stopped by its limits."""

from __future__ import annotations

import pytest

from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput
from ember.scaling import CodeVerifier, SandboxLimits, best_of_n, extract_code, run_sandboxed
from helpers import assert_no_leak

LIMITS = SandboxLimits(wall_seconds=2.0, cpu_seconds=5, memory_bytes=256 << 20)
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def _reply(code: str) -> CompletionOutput:
    return CompletionOutput(index=0, text=f"Here it is:\n```python\n{code}```\nDone.", token_ids=[1])


def test_correct_code_passes_and_wrong_code_fails():
    verifier = CodeVerifier(TESTS, LIMITS)
    assert verifier("", _reply("def add(a, b):\n    return a + b\n")) == 1.0
    wrong = verifier.verify("", _reply("def add(a, b):\n    return a - b\n"))
    assert wrong.status == "failed" and not wrong.passed and "AssertionError" in wrong.stderr
    assert verifier("", _reply("def add(a, b) return\n")) == 0.0  # a syntax error


def test_an_infinite_loop_is_killed_at_the_wall_clock_limit():
    result = run_sandboxed("while True:\n    pass\n", SandboxLimits(wall_seconds=1.0, cpu_seconds=30))
    assert result.status == "timeout" and result.returncode is None
    assert result.seconds < 20  # killed, not waited for


def test_cpu_time_is_limited():
    result = run_sandboxed("while True:\n    pass\n", SandboxLimits(wall_seconds=30.0, cpu_seconds=1))
    assert result.status == "cpu"


def test_a_memory_hog_gets_memory_error():
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n"
    result = run_sandboxed(hog, LIMITS)
    assert result.status == "memory" and "MemoryError" in result.stderr


def test_runs_isolated_in_a_temporary_directory():
    code = (
        "import os, sys\nassert sys.flags.isolated\n"
        "assert os.path.basename(os.getcwd()).startswith('ember-sandbox-')\n"
    )
    assert run_sandboxed(code, LIMITS).passed


def test_extract_code():
    assert extract_code("x\n```python\nprint(1)\n```\n```python\nprint(2)\n```") == "print(1)\n"
    assert extract_code("```\nplain\n```") == "plain\n"
    assert extract_code("```py\nunclosed = 1\n") == "unclosed = 1\n"
    assert extract_code("no fence") == "no fence"


def test_bad_limits_are_refused():
    with pytest.raises(InvalidRequestError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
    with pytest.raises(InvalidRequestError, match="memory_bytes"):
        SandboxLimits(memory_bytes=-1)


def test_best_of_n_with_a_verifier_picks_a_passing_completion(llm, prompt, short):
    # The random model writes no code: the program is scripted by completion index, only index 2 passes.
    def program(text: str, completion: CompletionOutput, tests: str) -> str:
        body = "a + b" if completion.index == 2 else "a * b"
        return f"def add(a, b):\n    return {body}\n{tests}"

    result = best_of_n(llm, prompt, 4, short, scorer=CodeVerifier(TESTS, LIMITS, program))
    assert result.scores == [0.0, 0.0, 1.0, 0.0] and result.best.index == 2
    assert result.accounting.scorer_calls == 4
    assert_no_leak(llm.engine)
