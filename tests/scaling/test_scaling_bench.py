"""`ember bench scaling` end to end on a tiny checkpoint (arithmetic only), and its flag checks."""

from __future__ import annotations

import json

import pytest

from ember.cli import main
from ember.scaling.bench import Row, summary_table


def test_bench_scaling_runs_end_to_end(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "scaling.json"
    argv = ["bench", "scaling", "--models", checkpoint_dir("llama"), "--tasks", "arithmetic", "--problems", "1",
            "--ns", "1,2", "--short-m", "2", "--sequential-n", "2", "--sequential-problems", "1",
            "--max-tokens-math", "6", "--dtype", "float32", "--output-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "first-finish" in printed and "particles logprob" in printed and "speedup" in printed
    report = json.loads(out.read_text())
    strategies = {(r["strategy"], r["n"]) for r in report["rows"]}
    assert strategies == {("coverage", 1), ("majority", 1), ("best-of-n logprob", 1), ("coverage", 2),
                          ("majority", 2), ("best-of-n logprob", 2), ("first-finish", 2),
                          ("particles logprob", 2)}  # fmt: skip
    full = next(r for r in report["rows"] if r["strategy"] == "coverage" and r["n"] == 2)
    early = next(r for r in report["rows"] if r["strategy"] == "first-finish")
    assert early["saved_tokens"] == full["tokens"] - early["tokens"] >= 0
    [sequential] = report["sequential"]
    assert sequential["n"] == 2 and 0 <= sequential["same_tokens"] <= 2


@pytest.mark.parametrize("flags", [["--ns", "0,2"], ["--problems", "0"], ["--tasks", "chess"]])
def test_bad_flags_are_one_line_errors(flags, capsys):
    assert main(["bench", "scaling", "--models", "unused", *flags]) == 2
    assert capsys.readouterr().err.startswith("ember: error:")


def test_summary_table_averages_per_strategy_and_n():
    rows = [Row("m", "arithmetic", f"p{i}", "majority", 4, i == 0, 100 + i, 2.0, 10) for i in range(2)]
    table = summary_table(rows)
    assert "majority" in table and "0.50" in table and "100" in table
