"""Token-DiFR: ember's own outputs verify exactly (every token the reference's sample, margin 0); outputs
of another configuration are told apart; tokens the sampler could never have drawn are impossible."""

from __future__ import annotations

import json
import math
import re

import pytest

from ember import LLM, SamplingParams
from ember.cli import main
from ember.errors import InvalidRequestError
from ember.verify import Claim, TokenVerifier, claim_from_dict, load_claims, roc_auc

PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "1, 2, 3,", "Dear diary, today"]


@pytest.fixture(scope="module")
def tiny(checkpoint_dir) -> LLM:
    return LLM(checkpoint_dir("llama"), dtype="float32", kv_cache_memory=0.25)


def _claims(llm: LLM, params: SamplingParams, prompts: list[str] = PROMPTS, as_params: SamplingParams | None = None) -> list[Claim]:
    """What `llm` generated for `prompts` (in one batch), claimed as generated with `as_params`."""
    claims = []
    for output in llm.generate(prompts, params, use_tqdm=False):
        for completion in output.outputs:
            claims.append(Claim(output.prompt_token_ids, completion.token_ids, as_params or params, completion.seed))
    return claims


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24),
    SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=3),
    SamplingParams(temperature=0.8, top_k=20, min_p=0.02, repetition_penalty=1.2, presence_penalty=0.5,
                   frequency_penalty=0.3, logit_bias={7: 3.0}, min_tokens=5, max_tokens=24, seed=4, n=2),
    SamplingParams(temperature=1.0, max_tokens=24),  # no seed: each sequence's own, returned per completion
], ids=["greedy", "top-p", "penalties-n2", "unseeded"])  # fmt: skip
def test_own_outputs_verify_exactly(family, checkpoint_dir, params):
    llm = LLM(checkpoint_dir(family), dtype="float32", kv_cache_memory=0.25)
    claims = _claims(llm, params)
    report = TokenVerifier(llm.engine, batch_size=3).verify_all(claims)
    assert report.aggregate["exact_match_rate"] == 1.0
    assert report.aggregate["mean_margin"] == 0.0 and report.aggregate["impossible_rate"] == 0.0
    assert report.aggregate["num_tokens"] == sum(len(c.output_token_ids) for c in claims)
    for claim, result in zip(claims, report.claims):
        assert result.reference_token_ids == claim.output_token_ids


def test_another_temperature_is_told_apart(tiny):
    honest = SamplingParams(temperature=1.0, max_tokens=32, seed=5)
    hotter = SamplingParams(temperature=1.6, max_tokens=32, seed=5)
    verifier = TokenVerifier(tiny.engine)
    good = verifier.verify_all(_claims(tiny, honest)).claims
    bad = verifier.verify_all(_claims(tiny, hotter, as_params=honest)).claims
    assert all(c.exact_match_rate == 1.0 for c in good)
    assert all(c.exact_match_rate < 1.0 and c.mean_margin > 0 for c in bad)
    assert roc_auc([c.divergence() for c in good], [c.divergence() for c in bad]) == 1.0


def test_tokens_the_generator_never_reaches_are_impossible(tiny):
    """Past max_tokens, or after an EOS: the generator would have stopped."""
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=1)
    claim = _claims(tiny, params, PROMPTS[:1])[0]
    verifier = TokenVerifier(tiny.engine)
    tokens = claim.output_token_ids
    longer = verifier.verify(Claim(claim.prompt_token_ids, [*tokens, tokens[-1]], params, claim.seed))
    assert longer.exact[:-1] == [True] * len(tokens) and math.isinf(longer.margins[-1])
    eos = tiny.engine.eos_token_ids[0]
    after_eos = verifier.verify(Claim(claim.prompt_token_ids, [eos, tokens[0]], SamplingParams(temperature=0), 0))
    assert math.isinf(after_eos.margins[1])


def test_outside_top_k_is_impossible(tiny):
    params = SamplingParams(temperature=1.0, top_k=1, max_tokens=4, seed=2)
    claim = _claims(tiny, params, PROMPTS[:1])[0]
    wrong = (claim.output_token_ids[0] + 1) % tiny.engine.model_config.vocab_size
    result = TokenVerifier(tiny.engine).verify(Claim(claim.prompt_token_ids, [wrong], params, claim.seed))
    assert result.impossible_rate == 1.0 and not result.exact[0]


def test_claims_file_errors(tmp_path):
    good = {"prompt_token_ids": [1, 2], "output_token_ids": [3], "sampling_params": {"temperature": 1.0}, "seed": 4}
    assert claim_from_dict(good, 100).seed == 4
    cases = [
        ("{not json", "not JSON"),
        (json.dumps({**good, "extra": 1}), "unknown claim field 'extra'"),
        (json.dumps({**good, "seed": None}), "seed is required"),
        (json.dumps({**good, "sampling_params": {"n": 2}}), "n must be 1"),
        (json.dumps({**good, "sampling_params": {"temprature": 1}}), "sampling_params"),
        (json.dumps({**good, "output_token_ids": [500]}), "[0, 100)"),
        (json.dumps({**good, "output_token_ids": []}), "must not be empty"),
    ]
    for line, message in cases:
        path = tmp_path / "claims.jsonl"
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(InvalidRequestError, match="claims.jsonl:2: .*" + re.escape(message)):
            load_claims(str(path), 100)


def test_roc_auc():
    assert roc_auc([0.0, 0.1], [0.2, 0.3]) == 1.0
    assert roc_auc([0.2, 0.3], [0.0, 0.1]) == 0.0
    assert roc_auc([0.5, 0.5], [0.5, 0.5]) == 0.5
    assert roc_auc([0.1, 0.4], [0.2, 0.5]) == 0.75


def test_cli_verify(tiny, checkpoint_dir, tmp_path, capsys):
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=9)
    lines = [json.dumps({"id": f"c{i}", "prompt_token_ids": c.prompt_token_ids, "output_token_ids": c.output_token_ids,
                         "sampling_params": {"temperature": 1.0, "max_tokens": 12}, "seed": c.seed})
             for i, c in enumerate(_claims(tiny, params))]  # fmt: skip
    claims, out = tmp_path / "claims.jsonl", tmp_path / "report.json"
    claims.write_text("\n".join(lines) + "\n")
    assert main(["verify", "--model", checkpoint_dir("llama"), "--dtype", "float32", "--kv-cache-memory", "0.25",
                 "--claims", str(claims), "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["exact_match_rate"] == 1.0 and report["num_claims"] == len(PROMPTS)
    assert [c["id"] for c in report["claims"]] == [f"c{i}" for i in range(len(PROMPTS))]
    assert "c4" in capsys.readouterr().out
    claims.write_text('{"prompt_token_ids": [1]}\n')
    assert main(["verify", "--model", checkpoint_dir("llama"), "--claims", str(claims)]) == 2


def test_default_model_own_outputs_exact_and_temperature_told_apart():
    """The default model as ember runs it by default (GGUF blocks kept quantized, bfloat16), claims from a
    batch of 6: exact; the same prompts sampled at temperature 0.7 but claimed at 1.0 are told apart."""
    llm = LLM(kv_cache_memory=1.0, max_num_seqs=8)
    prompts = [*PROMPTS, "The best way to learn"]
    honest = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=32, seed=21)
    cooler = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=32, seed=21)
    verifier = TokenVerifier(llm.engine)
    good = verifier.verify_all(_claims(llm, honest, prompts))
    bad = verifier.verify_all(_claims(llm, cooler, prompts, as_params=honest))
    assert good.aggregate["exact_match_rate"] == 1.0 and good.aggregate["mean_margin"] == 0.0
    assert bad.aggregate["exact_match_rate"] < 0.95
    assert roc_auc([c.divergence() for c in good.claims], [c.divergence() for c in bad.claims]) >= 0.9
