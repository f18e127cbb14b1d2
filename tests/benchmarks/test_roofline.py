"""The roofline report: exact byte and FLOP counts for a step's shape, phases that add up to the step, the
profiler leaving the engine as it found it, and `ember bench latency` writing the report and its plot.
No speed assertions."""

from __future__ import annotations

import json

import pytest

from ember import LLM, SamplingParams
from ember.benchmarks.roofline import ModelCost, visible_pairs
from ember.benchmarks.step_profile import PHASES, StepProfiler
from ember.cli import main
from ember.engine.scheduler import ScheduledRequest, SchedulerOutput


@pytest.mark.parametrize("window", [None, 1, 3, 8, 40])
def test_visible_pairs_counts_each_querys_keys(window):
    for start in range(0, 12):
        for count in range(1, 12):
            seen = sum(min(p + 1, window or p + 1) for p in range(start, start + count))
            assert visible_pairs(start, count, window) == seen, (start, count, window)


def test_step_cost_of_a_known_shape(checkpoint_dir):
    llm = LLM(checkpoint_dir("llama"), dtype="float32", block_size=4)
    cost = ModelCost.of_engine(llm.engine)
    model, config = llm.engine.runner.model, llm.engine.model_config
    matmul_elements = sum(p.numel() for name, p in model.named_parameters() if name.endswith("proj.weight"))
    assert cost.linear_elements == matmul_elements and cost.linear_bytes == 4 * matmul_elements
    assert cost.head_elements == config.vocab_size * config.hidden_size == cost.head_bytes // 4
    per_token = 2 * config.num_key_value_heads * config.head_dim * 4  # keys and values, float32
    assert cost.kv_bytes_per_token == (per_token,) * config.num_hidden_layers
    # A 5-token prefill chunk after 3 cached tokens, and a decode at position 9 with 2 drafts.
    scheduled = SchedulerOutput(scheduled=[
        ScheduledRequest("a", num_computed_tokens=3, num_new_tokens=5, block_ids=[[1, 2]], samples=True),
        ScheduledRequest("b", num_computed_tokens=9, num_new_tokens=3, block_ids=[[3, 4, 5]], spec_token_ids=[7, 8],
                         samples=True),
    ])  # fmt: skip
    step = cost.step(scheduled)
    assert step["weights"] == (4 * matmul_elements, 2 * matmul_elements * 8)
    assert step["lm_head"] == (cost.head_bytes, 2 * cost.head_elements * (1 + 3))
    pairs = (4 + 5 + 6 + 7 + 8) + (10 + 11 + 12)
    layers = config.num_hidden_layers
    assert step["attention"] == ((8 + 12) * per_token * layers, 4 * config.num_attention_heads * config.head_dim * pairs * layers)


@pytest.mark.parametrize("speculation", [None, {"method": "layer_skip", "skip_layers": [1], "num_speculative_tokens": 2}])
def test_phases_add_up_and_the_engine_is_restored(checkpoint_dir, speculation):
    llm = LLM(checkpoint_dir("llama"), dtype="float32", block_size=4, speculative_config=speculation)
    engine, model = llm.engine, llm.engine.runner.model
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = llm.generate(["a b c d e f", "g h"], params, use_tqdm=False)
    with StepProfiler(engine) as profiler:
        got = llm.generate(["a b c d e f", "g h"], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert {r.kind for r in profiler.records} == {"prefill", "decode"}
    keys = {key for key, _ in PHASES}
    for record in profiler.records:
        assert set(record.phases) <= keys
        assert sum(record.phases.values()) == pytest.approx(record.seconds, rel=1e-9)
        # Remainders of measured intervals: a phase counted twice (a layer-skip draft's modules) would go negative.
        assert record.phases["forward_other"] >= -1e-6 and record.phases["runner_other"] >= -1e-6
        assert record.phases["weights"] > 0 and record.phases["attention"] > 0 and record.phases["lm_head"] > 0
    if speculation:
        assert all(r.phases.get("drafting", 0) > 0 for r in profiler.records if r.kind == "decode")
    total = sum(r.seconds for r in profiler.records)
    assert sum(r.phases["unaccounted"] for r in profiler.records) < 0.1 * total
    assert not any(name in vars(engine) for name in ("step",))
    assert not any(name in vars(engine.scheduler) for name in ("schedule", "update_from_output"))
    assert type(engine.runner.sampler).__name__ == "Sampler" and "compute_logits" not in vars(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bench_latency_prints_writes_and_plots_the_roofline(checkpoint_dir, tmp_path, capsys):
    out, png = tmp_path / "latency.json", tmp_path / "roofline.png"
    args = ["bench", "latency", "--model", checkpoint_dir("llama"), "--dtype", "float32", "--input-len", "8",
            "--output-len", "4", "--num-iters", "1", "--output-json", str(out), "--plot", str(png)]  # fmt: skip
    assert main(args) == 0
    roofline = json.loads(out.read_text())["roofline"]
    assert roofline["ceilings"]["read_gbs"] > 0 and roofline["ceilings"]["matmul_gflops"]["bfloat16"] > 0
    kinds = {k["kind"]: k for k in roofline["kinds"]}
    assert set(kinds) == {"prefill", "decode"} and kinds["decode"]["tokens_per_step"] == 1
    for figures in kinds.values():
        assert sum(p["ms"] for p in figures["phases"]) == pytest.approx(figures["step_ms"], rel=1e-6)
        weights = next(p for p in figures["phases"] if p["key"] == "weights")
        assert weights["bytes"] > 0 and weights["gbs"] == pytest.approx(weights["bytes"] / weights["ms"] / 1e6)
    assert set(roofline["unprofiled_step_ms"]) == {"prefill", "decode"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "Roofline" in printed and "| matmuls over weights |" in printed and "TPOT ms" in printed
