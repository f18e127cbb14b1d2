"""`ember bench scaling` (also `bench/bench_scaling.py`): accuracy against compute for the scaling strategies.

For each model, task (HumanEval, seeded arithmetic word problems) and problem, and each N:
- one request of N samples; from it coverage (pass@N: any sample right, i.e. an oracle verifier), majority
  vote (self-consistency) and best-of-N by the model's mean log-probability (and by a reward model with
  `--reward-model`), with the run's tokens, wall time and peak KV blocks;
- first-finish and short-m@k runs at the same N and seed, whose samples are the same as the full run's up to
  where they stop (a seeded sample does not depend on its batch), so the tokens saved are exact;
- particle filtering with N particles (steps end at a blank line or after `--step-tokens` tokens), weighted by
  the model's mean log-probability of each partial answer (or by the reward model with `--reward-model`).
Then N samples in one request against N requests of one sample run one after the other, at `--sequential-n`.
Wall time is the engine's (sampling, and a reward model's scoring); grading in the sandbox is not counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from tqdm.auto import tqdm

from ember.engine.llm import LLM
from ember.errors import EmberError
from ember.model_zoo import qwen25_coder_05b_path, qwen25_coder_15b_path
from ember.outputs import CompletionOutput
from ember.sampling_params import SamplingParams, StepBoundary
from ember.scaling.accounting import Accounting
from ember.scaling.early_stop import FIRST_FINISH, EarlyStop
from ember.scaling.particle_filter import particle_filter
from ember.scaling.reward_model import RewardModel
from ember.scaling.sampling import Samples, sample
from ember.scaling.selection import Scorer, best_index, mean_logprob, score_all
from ember.scaling.self_consistency import majority_vote
from ember.scaling.tasks import Problem, task_problems

MODELS: dict[str, Callable[[], str]] = {"0.5b": qwen25_coder_05b_path, "1.5b": qwen25_coder_15b_path}
QUICK = {"models": "0.5b", "problems": 2, "ns": "1,2,4", "sequential_n": 4, "sequential_problems": 1,
         "max_tokens_code": 320, "max_tokens_math": 256}  # fmt: skip


@dataclass
class Row:
    """One strategy at one N on one problem."""

    model: str
    task: str
    problem_id: str
    strategy: str
    n: int
    correct: bool
    tokens: int
    seconds: float
    peak_kv_blocks: int
    saved_tokens: int | None = None  # early stops: tokens the full run of the same N and seed spent beyond it


@dataclass
class SequentialRow:
    model: str
    task: str
    problem_id: str
    n: int
    batched_seconds: float
    sequential_seconds: float
    same_tokens: int  # samples whose tokens are the same either way


class Grader:
    """Grades each distinct completion text of a problem once (the N runs share their first samples)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], bool] = {}

    def __call__(self, problem: Problem, completion: CompletionOutput | None) -> bool:
        if completion is None:
            return False
        key = (problem.problem_id, completion.text)
        if key not in self._cache:
            self._cache[key] = problem.grade(completion)
        return self._cache[key]


# -- CLI ---------------------------------------------------------------------------------------------------


def add_scaling_bench_parser(kinds: Any) -> None:
    parser = kinds.add_parser(
        "scaling", help="accuracy vs N for best-of-N, self-consistency, early stops and particle filtering"
    )
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="0.5b,1.5b",
                        help="comma-separated: 0.5b, 1.5b (Qwen2.5-Coder Instruct GGUFs) or paths (default: 0.5b,1.5b)")
    parser.add_argument("--tasks", default="humaneval,arithmetic",
                        help="comma-separated: humaneval, arithmetic (default: both)")
    parser.add_argument("--problems", type=int, default=20, help="problems per task (default: 20)")
    parser.add_argument("--ns", default="1,2,4,8,16", help="sample counts N (default: 1,2,4,8,16)")
    parser.add_argument("--short-m", type=int, default=3, help="m of short-m@k, run where 1 < m < N (default: 3)")
    parser.add_argument("--sequential-n", type=int, default=8, help="N of the batched-vs-sequential runs (default: 8)")
    parser.add_argument("--sequential-problems", type=int, default=5,
                        help="problems per task timed batched vs sequential (default: 5)")
    parser.add_argument("--step-tokens", type=int, default=64,
                        help="particle filtering: most tokens in one step (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: 0.95)")
    parser.add_argument("--max-tokens-code", type=int, default=384, help="HumanEval max_tokens (default: 384)")
    parser.add_argument("--max-tokens-math", type=int, default=256, help="arithmetic max_tokens (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems and the samples (default: 0)")
    parser.add_argument("--reward-model", default=None,
                        help="also best-of-N by this model's mean log-probability of each completion "
                             "(0.5b, 1.5b or a path)")
    parser.add_argument("--dtype", default="auto", help="compute dtype (default: auto)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (overrides the flags it sets): 0.5b, 2 problems per task, N = 1,2,4, short "
                             "outputs, sequential at N = 4 on 1 problem")
    parser.add_argument("--output-json", default=None, help="also write every row to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="log engine details to stderr")


@dataclass
class Settings:
    models: list[str]
    tasks: list[str]
    problems: int
    ns: list[int]
    short_m: int
    step_tokens: int
    sequential_n: int
    sequential_problems: int
    temperature: float
    top_p: float
    max_tokens: dict[str, int]
    seed: int
    reward_model: str | None
    dtype: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        values = vars(args) | (QUICK if args.quick else {})
        settings = cls(
            models=_split(values["models"]), tasks=_split(values["tasks"]), problems=values["problems"],
            ns=[_positive(int(n), "--ns") for n in _split(values["ns"])],
            short_m=_positive(values["short_m"], "--short-m"),
            step_tokens=_positive(values["step_tokens"], "--step-tokens"),
            sequential_n=_positive(values["sequential_n"], "--sequential-n"),
            sequential_problems=values["sequential_problems"], temperature=values["temperature"],
            top_p=values["top_p"],
            max_tokens={"humaneval": values["max_tokens_code"], "arithmetic": values["max_tokens_math"]},
            seed=values["seed"], reward_model=values["reward_model"], dtype=values["dtype"],
        )  # fmt: skip
        _positive(settings.problems, "--problems")
        return settings


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise EmberError(f"{flag} must be at least 1, got {value}")
    return value


def model_path(name: str) -> str:
    return MODELS[name]() if name in MODELS else name


def run_scaling_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of `ember bench scaling`: runs the sweep, prints the tables, returns (and saves) the rows."""
    settings = Settings.from_args(args)
    problems = {task: task_problems(task, settings.problems, settings.seed) for task in settings.tasks}
    reward = None
    if settings.reward_model:
        reward = RewardModel.load(model_path(settings.reward_model), dtype=settings.dtype)
    rows: list[Row] = []
    sequential: list[SequentialRow] = []
    for name in settings.models:  # one model in memory at a time
        model_rows, model_sequential = _bench_model(name, settings, problems, reward)
        rows += model_rows
        sequential += model_sequential
    print(summary_table(rows))
    print()
    print(sequential_table(sequential))
    report = {"settings": asdict(settings), "rows": [asdict(r) for r in rows],
              "sequential": [asdict(r) for r in sequential]}  # fmt: skip
    if args.output_json:
        try:
            with open(args.output_json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        except OSError as e:
            raise EmberError(f"cannot write {args.output_json!r}: {e.strerror}") from e
        print(f"wrote {args.output_json}", file=sys.stderr)
    return report


def _bench_model(
    name: str, settings: Settings, problems: dict[str, list[Problem]], reward: RewardModel | None
) -> tuple[list[Row], list[SequentialRow]]:
    llm = LLM(model_path(name), dtype=settings.dtype)
    llm.generate("warm up", SamplingParams(n=2, max_tokens=4), use_tqdm=False)  # kernel builds, first-call costs
    rows: list[Row] = []
    sequential: list[SequentialRow] = []
    for task_list in problems.values():
        bench = TaskBench(llm, name, settings, reward)
        rows += bench.sweep(task_list)
        sequential += bench.sequential(task_list[: settings.sequential_problems])
    return rows, sequential


# -- runs --------------------------------------------------------------------------------------------------


class TaskBench:
    """The runs of one model on one task's problems."""

    def __init__(self, llm: LLM, model: str, settings: Settings, reward: RewardModel | None) -> None:
        self.llm = llm
        self.model = model
        self.settings = settings
        self.reward = reward
        self.grade = Grader()

    def prompt(self, problem: Problem) -> list[int]:
        tokenizer = self.llm.get_tokenizer()
        text = tokenizer.apply_chat_template([{"role": "user", "content": problem.user_message}])
        return tokenizer.encode(text, add_special_tokens=False)

    def params(self, problem: Problem, index: int) -> SamplingParams:
        s = self.settings
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens[problem.task],
                              seed=s.seed + 1000 * index)  # fmt: skip

    def sweep(self, problems: Sequence[Problem]) -> list[Row]:
        rows: list[Row] = []
        bar = tqdm(list(enumerate(problems)), desc=f"{self.model} {problem_task(problems)}", unit="problem")
        for index, problem in bar:
            for n in self.settings.ns:
                rows += self.problem_rows(problem, self.prompt(problem), self.params(problem, index), n)
            bar.set_postfix(tokens=sum(r.tokens for r in rows if r.strategy == "coverage"))
        return rows

    def problem_rows(self, problem: Problem, prompt: list[int], params: SamplingParams, n: int) -> list[Row]:
        full = sample(self.llm, prompt, n, params)
        rows = [
            self._row(problem, "coverage", full.accounting, any(self.grade(problem, c) for c in full.completions)),
            self._row(problem, "majority", full.accounting,
                      self.grade(problem, self._majority(problem, full.candidates))),
            self._row(problem, "best-of-n logprob", full.accounting,
                      self.grade(problem, self._best(full, mean_logprob)[0])),
        ]  # fmt: skip
        if self.reward is not None:
            best, seconds = self._best(full, self.reward)
            row = self._row(problem, "best-of-n reward", full.accounting, self.grade(problem, best))
            rows.append(replace(row, seconds=row.seconds + seconds))
        if n > 1:
            boundary = StepBoundary("\n\n", self.settings.step_tokens)
            scorer = self.reward if self.reward is not None else mean_logprob
            particles = particle_filter(self.llm, prompt, n, params, scorer, boundary, seed=self.settings.seed)
            acc = particles.accounting
            name = "particles reward" if self.reward is not None else "particles logprob"
            row = self._row(problem, name, acc, self.grade(problem, particles.best))
            rows.append(replace(row, seconds=acc.wall_seconds))  # scoring is part of the search
            rows.append(self._early(problem, prompt, params, n, FIRST_FINISH, full))
        if 1 < self.settings.short_m < n:  # short-1@k is first-finish
            rows.append(self._early(problem, prompt, params, n, EarlyStop(self.settings.short_m), full))
        return rows

    def _early(self, problem: Problem, prompt: list[int], params: SamplingParams, n: int, stop: EarlyStop,
               full: Samples) -> Row:  # fmt: skip
        early = sample(self.llm, prompt, n, params, early_stop=stop)
        name = "first-finish" if stop.m == 1 else f"short-{stop.m}@k"
        row = self._row(problem, name, early.accounting, self.grade(problem, self._majority(problem, early.candidates)))
        return replace(row, saved_tokens=full.accounting.generated_tokens - early.accounting.generated_tokens)

    def _majority(self, problem: Problem, candidates: list[CompletionOutput]) -> CompletionOutput | None:
        tally = majority_vote(candidates, [problem.answer(c.text) for c in candidates])
        return tally.supporting[0] if tally.supporting else None

    def _best(self, samples: Samples, scorer: Scorer) -> tuple[CompletionOutput, float]:
        scores, seconds = score_all(scorer, samples.prompt, samples.candidates)
        return samples.candidates[best_index(scores)], seconds

    def _row(self, problem: Problem, strategy: str, acc: Accounting, correct: bool) -> Row:
        return Row(self.model, problem.task, problem.problem_id, strategy, acc.num_samples, correct,
                   acc.generated_tokens, acc.sampling_seconds, acc.peak_kv_blocks)  # fmt: skip

    def sequential(self, problems: Sequence[Problem]) -> list[SequentialRow]:
        """N samples in one request against N one-sample requests one after the other (seeds seed + i, the
        seeds the request's N samples get), on the same prompt."""
        n = self.settings.sequential_n
        rows = []
        desc = f"{self.model} {problem_task(problems)} batched vs sequential"
        for index, problem in enumerate(tqdm(problems, desc=desc, unit="problem")):
            prompt, params = self.prompt(problem), self.params(problem, index)
            batched = sample(self.llm, prompt, n, params)
            assert params.seed is not None
            alone = [sample(self.llm, prompt, 1, replace(params, seed=params.seed + i)) for i in range(n)]
            same = sum(a.completions[0].token_ids == b.token_ids for a, b in zip(alone, batched.completions))
            seconds = sum(a.accounting.sampling_seconds for a in alone)
            rows.append(SequentialRow(self.model, problem.task, problem.problem_id, n,
                                      batched.accounting.sampling_seconds, seconds, same))  # fmt: skip
        return rows


def problem_task(problems: Sequence[Problem]) -> str:
    return problems[0].task if problems else ""


# -- tables ------------------------------------------------------------------------------------------------


def summary_table(rows: list[Row]) -> str:
    """Per model, task, strategy and N: accuracy, and the means per problem of tokens, seconds, peak KV blocks
    and (early stops) tokens saved against the full run."""
    groups: dict[tuple[str, str, str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.model, row.task, row.strategy, row.n), []).append(row)
    lines = [f"{'model':<8} {'task':<11} {'strategy':<18} {'N':>3} {'problems':>8} {'accuracy':>8} "
             f"{'tokens':>8} {'seconds':>8} {'acc/s':>7} {'KV blocks':>9} {'saved':>7}"]  # fmt: skip
    for (model, task, strategy, n), group in sorted(groups.items(), key=lambda kv: (kv[0][:2], kv[0][3], kv[0][2])):
        accuracy = statistics.fmean(r.correct for r in group)
        seconds = statistics.fmean(r.seconds for r in group)
        saved = [r.saved_tokens for r in group if r.saved_tokens is not None]
        saved_text = f"{statistics.fmean(saved):7.0f}" if saved else f"{'':>7}"
        lines.append(
            f"{model:<8} {task:<11} {strategy:<18} {n:>3} {len(group):>8} {accuracy:>8.2f} "
            f"{statistics.fmean(r.tokens for r in group):>8.0f} {seconds:>8.2f} {accuracy / seconds:>7.3f} "
            f"{statistics.fmean(r.peak_kv_blocks for r in group):>9.0f} {saved_text}"
        )
    return "\n".join(lines)


def sequential_table(rows: list[SequentialRow]) -> str:
    lines = [f"{'model':<8} {'task':<11} {'N':>3} {'problems':>8} {'batched s':>9} {'sequential s':>12} "
             f"{'speedup':>7} {'same tokens':>11}"]  # fmt: skip
    groups: dict[tuple[str, str, int], list[SequentialRow]] = {}
    for row in rows:
        groups.setdefault((row.model, row.task, row.n), []).append(row)
    for (model, task, n), group in groups.items():
        batched = sum(r.batched_seconds for r in group)
        alone = sum(r.sequential_seconds for r in group)
        same = f"{sum(r.same_tokens for r in group)}/{n * len(group)}"
        lines.append(f"{model:<8} {task:<11} {n:>3} {len(group):>8} {batched:>9.2f} {alone:>12.2f} "
                     f"{alone / batched:>6.2f}x {same:>11}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        run_scaling_bench(args)
    except EmberError as e:  # a missing package or a bad flag: one line, as `ember bench scaling` prints it
        parser.exit(2, f"bench_scaling: error: {e}\n")
