"""`ember quantize` end to end on tiny checkpoints: the folder it writes loads with LLM, generates, and
scores with `ember eval`; the summary reports per-layer errors."""

from __future__ import annotations

import json
import os

import pytest

from checkpoints import CORPUS
from ember import LLM, SamplingParams
from ember.cli import main


@pytest.mark.parametrize(
    "family,flags",
    [
        ("llama", ["--method", "gptq", "--bits", "4", "--group-size", "32"]),
        ("gemma3", ["--method", "awq", "--bits", "4", "--group-size", "64"]),
        ("qwen2", ["--method", "gptq", "--bits", "8", "--group-size", "32", "--act-order", "--lm-head"]),
    ],
)
def test_quantize_writes_a_loadable_checkpoint(checkpoint_dir, tmp_path, family, flags):
    out, summary = str(tmp_path / "q"), str(tmp_path / "summary.json")
    argv = ["quantize", "--model", checkpoint_dir(family), "--out", out, "--calib-samples", "4", "--calib-len", "32",
            "--no-progress", "--json", summary, *flags]  # fmt: skip
    assert main(argv) == 0
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)["quantization_config"]
    method, bits, group = flags[1], int(flags[3]), int(flags[5])
    assert (config["method"], config["bits"], config["group_size"]) == (method, bits, group)
    assert config["lm_head"] == ("--lm-head" in flags)
    with open(summary, encoding="utf-8") as f:
        errors = json.load(f)["relative_error"]
    assert errors and all(0 <= e < (0.05 if bits == 4 else 0.001) for e in errors.values())
    llm = LLM(out, dtype="float32")
    output = llm.generate("The quick brown", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(output[0].outputs[0].token_ids) == 6
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS), encoding="utf-8")
    result = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--model", out, "--text", str(text), "--ctx", "16", "--no-progress",
                 "--json", str(result)]) == 0  # fmt: skip
    ppl = json.loads(result.read_text())["ppl"]
    assert 1.0 < ppl < 2 * 512  # a random model: about the vocabulary size, not nan/inf
    kld = tmp_path / "kld.json"
    assert main(["eval", "kld", "--model", out, "--reference", checkpoint_dir(family), "--text", str(text),
                 "--ctx", "16", "--no-progress", "--json", str(kld)]) == 0  # fmt: skip
    record = json.loads(kld.read_text())
    assert record["exact"] and record["ppl_model"] == pytest.approx(ppl, rel=1e-3)
    assert 0 < record["mean_kld"] < 0.5 and record["top1_agreement"] > 0.5


def test_bad_arguments_are_clear_errors(checkpoint_dir, tmp_path, capsys):
    folder = checkpoint_dir("llama")
    assert main(["quantize", "--model", folder, "--out", str(tmp_path), "--method", "rtn", "--act-order"]) == 2
    assert "act-order" in capsys.readouterr().err
    assert main(["quantize", "--model", folder, "--out", str(tmp_path), "--group-size", "48"]) == 2
    assert "group size" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--model", folder, "--text", "no-such-file", "--ctx", "16"]) == 2
    assert main(["eval", "kld", "--model", folder, "--ctx", "16"]) == 2
    assert "--reference" in capsys.readouterr().err
