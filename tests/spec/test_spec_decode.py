"""Speculative decoding is lossless: the same tokens as decoding without it, greedy and seeded, in mixed
batches, with prefix-cache hits, chunked prefill, preemption and n > 1; and sampled tokens follow the
target's distribution whether drafts are accepted or not. Tiny random checkpoints in float32 (where
ember's outputs do not depend on batch composition)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import assert_no_leak

from ember import LLM, SamplingParams
from ember.errors import EmberError, InvalidRequestError
from ember.spec.config import SpeculativeConfig
from ember.spec.ngram import NgramProposer
from ember.spec.proposer import DraftRequest, Proposer

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _prompts() -> list[list[int]]:
    """Copy-heavy prompts (repeated spans, so drafts are proposed) and a random one."""
    g = torch.Generator().manual_seed(0)
    span = torch.randint(4, 500, (9,), generator=g).tolist()
    other = torch.randint(4, 500, (23,), generator=g).tolist()
    return [span * 4, other, span[:4] * 3 + other, other[:7] * 5]


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [c.token_ids for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, checkpoint_dir):
    return checkpoint_dir(family)


@pytest.fixture(params=["ngram", "draft_model", "self_draft", "layer_skip"])
def method(request) -> str:
    return request.param


@pytest.fixture
def spec_config(method, family, checkpoint_dir) -> dict:
    """Each proposer: a draft of another family sharing the tokenizer (random weights: drafts mostly
    rejected), the target drafting for itself (mostly accepted), and the target skipping its middle layer."""
    if method == "ngram":
        return NGRAM
    if method == "draft_model":
        other = checkpoint_dir("qwen2" if family == "llama" else "llama")
        return {"method": "draft_model", "model": other, "num_speculative_tokens": 3, "draft_p_min": 0.0}
    if method == "self_draft":
        return {"method": "draft_model", "model": checkpoint_dir(family), "num_speculative_tokens": 4, "draft_p_min": 0.0}
    return {"method": "layer_skip", "skip_layers": [1], "num_speculative_tokens": 3, "draft_p_min": 0.0}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=40, ignore_eos=True),
        SamplingParams(n=3, temperature=0.8, seed=3, max_tokens=24, ignore_eos=True, logprobs=2),
    ],
    ids=["greedy", "seeded", "n3"],
)
def test_same_tokens_with_and_without_speculation(checkpoint, method, spec_config, params):
    prompts = _prompts()
    plain = LLM(checkpoint, dtype="float32", block_size=4)
    expected = _tokens(plain, prompts, params)
    spec = LLM(checkpoint, dtype="float32", block_size=4, speculative_config=spec_config)
    assert _tokens(spec, prompts, params) == expected
    assert _tokens(spec, prompts, params) == expected  # again: every prompt is a prefix-cache hit now
    stats = spec.engine.scheduler.spec_stats
    assert stats.num_draft_tokens > 0
    # Random weights: sampled text rarely repeats, and another random model rarely agrees.
    if params.temperature == 0 and method in ("ngram", "self_draft"):
        assert stats.num_accepted_tokens > 0
    assert_no_leak(spec.engine)


def test_lossless_under_chunked_prefill_and_preemption(checkpoint, spec_config):
    prompts = _prompts() * 2
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = _tokens(LLM(checkpoint, dtype="float32", block_size=4), prompts, params)
    # 24-token steps chunk the prompts; a 160-token pool cannot hold all 8 requests: preemptions.
    spec = LLM(checkpoint, dtype="float32", block_size=4, max_num_batched_tokens=24, kv_cache_tokens=160,
               speculative_config=spec_config)
    assert _tokens(spec, prompts, params) == expected
    assert spec.engine.scheduler.num_preemptions > 0
    assert_no_leak(spec.engine)


def test_logprobs_and_stop_strings_match(checkpoint, spec_config):
    prompts = _prompts()
    plain = LLM(checkpoint, dtype="float32", block_size=4)
    tokenizer = plain.get_tokenizer()
    stop = tokenizer.decode(_tokens(plain, prompts[:1], SamplingParams(temperature=0, max_tokens=12))[0][6:8])
    params = SamplingParams(temperature=0, max_tokens=30, logprobs=3, stop=[stop] if stop.strip() else None)
    spec = LLM(checkpoint, dtype="float32", block_size=4, speculative_config=spec_config)
    for a, b in zip(plain.generate(prompts, params, use_tqdm=False), spec.generate(prompts, params, use_tqdm=False)):
        x, y = a.outputs[0], b.outputs[0]
        assert (x.text, x.token_ids, x.finish_reason, x.stop_reason) == (y.text, y.token_ids, y.finish_reason, y.stop_reason)
        assert [{t: round(l.logprob, 4) for t, l in p.items()} for p in x.logprobs] == [
            {t: round(l.logprob, 4) for t, l in p.items()} for p in y.logprobs
        ]
        assert math.isclose(x.cumulative_logprob, y.cumulative_logprob, rel_tol=1e-5, abs_tol=1e-5)


def test_sampled_tokens_follow_the_target_distribution(checkpoint_dir):
    """Chi-square over (first, second) token pairs at top-k 4. Every second token is verified against a
    draft: one of the target's top-4 next tokens, so drafts are both accepted and rejected."""
    path = checkpoint_dir("llama")
    prompt = torch.randint(4, 500, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    params = dict(temperature=1.0, top_k=4, max_tokens=2, ignore_eos=True)
    plain = LLM(path, dtype="float32", block_size=4)
    first = _top_probs(plain, prompt, params)
    second = {t1: _top_probs(plain, prompt + [t1], params) for t1 in first}
    drafts = {t1: sorted(probs, key=probs.get)[-2] for t1, probs in second.items()}  # the 2nd most likely
    spec = LLM(path, dtype="float32", block_size=4, speculative_config=NGRAM)
    spec.engine.runner.proposer = _LastTokenProposer(drafts)
    count = 800
    outs = spec.generate([prompt] * count, [SamplingParams(seed=s, **params) for s in range(count)], use_tqdm=False)
    pairs = [tuple(o.outputs[0].token_ids) for o in outs]
    stats = spec.engine.scheduler.spec_stats
    assert stats.num_drafts == count and 0 < stats.num_accepted_tokens < count
    expected = {(t1, t2): count * p1 * p2 for t1, p1 in first.items() for t2, p2 in second[t1].items()}
    observed = {cell: pairs.count(cell) for cell in expected}
    assert sum(observed.values()) == count  # nothing outside the top-k cells
    chi2 = sum((observed[c] - e) ** 2 / e for c, e in expected.items())
    assert chi2 < 37.7, f"chi-square {chi2:.1f} over {len(expected) - 1} degrees of freedom (p < 0.001 bound)"


class _LastTokenProposer(Proposer):
    """A deterministic draft of one token, chosen by the last token (a proposer, not a model)."""

    def __init__(self, drafts: dict[int, int]) -> None:
        self.drafts = drafts

    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        outputs = [r.state.output_token_ids for r in requests]
        return [[self.drafts[o[-1]]] if r.samples and len(o) == 1 else [] for r, o in zip(requests, outputs)]


def _top_probs(llm: LLM, prompt: list[int], params: dict) -> dict[int, float]:
    """The target's top-k distribution of the next token (renormalized raw logprobs)."""
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=params["top_k"]), use_tqdm=False)
    entry = out.outputs[0].logprobs[0]
    top = sorted(entry.items(), key=lambda item: item[1].rank)[: params["top_k"]]
    total = sum(math.exp(l.logprob) for _, l in top)
    return {t: math.exp(l.logprob) / total for t, l in top}


def test_ngram_proposer_prefers_the_longest_match():
    proposer = NgramProposer(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)
    assert proposer.propose_one([1, 2, 3, 9, 9, 5, 2, 3, 4, 7, 1, 2, 3]) == [9, 9, 5]  # [1,2,3] beats [2,3]
    assert proposer.propose_one([5, 5, 5, 5, 5, 5]) == [5, 5, 5]  # a run: a match with k followers
    assert proposer.propose_one([1, 2, 3, 4]) == []


@pytest.mark.parametrize(
    "config, message",
    [
        ({"method": "eagle"}, "unknown speculative method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_max"),
        ({"method": "ngram", "bogus": 1}, "unknown field"),
        ("{not json", "not valid JSON"),
        ({"method": "draft_model"}, 'needs "model"'),
        ({"method": "ngram", "model": "draft.gguf"}, "only used by"),
        ({"method": "draft_model", "model": "draft.gguf", "draft_p_min": 2}, "draft_p_min"),
        ({"method": "layer_skip"}, "needs one of"),
        ({"method": "layer_skip", "skip_layers": []}, "non-empty list"),
        ({"method": "layer_skip", "skip_layers": [1], "skip_layers_file": "f.json"}, "needs one of"),
        ({"method": "ngram", "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ],
)
def test_bad_settings_are_one_clear_error(config, message):
    with pytest.raises(InvalidRequestError, match=message):
        SpeculativeConfig.parse(config)


def test_engine_refuses_bad_drafts_before_loading(checkpoint_dir, tmp_path):
    from ember.model_zoo import default_model_path

    target = checkpoint_dir("llama")
    cases = [
        ({"method": "draft_model", "model": default_model_path()}, "different vocabulary"),
        ({"method": "draft_model", "model": str(tmp_path / "missing.gguf")}, "does not exist"),
        ({"method": "layer_skip", "skip_layers": [3]}, "past the model's 3 layers"),
        ({"method": "layer_skip", "skip_layers": [0, 1, 2]}, "every layer"),
        ({"method": "layer_skip", "skip_layers_file": str(tmp_path / "none.json")}, "not a calibration file"),
    ]
    for config, message in cases:
        with pytest.raises(EmberError, match=message):
            LLM(target, dtype="float32", speculative_config=config)


def test_layer_skip_calibration_writes_a_usable_file(checkpoint_dir, tmp_path):
    from ember.cli import main

    path = checkpoint_dir("llama")
    output = tmp_path / "skip.json"
    assert main(["calibrate-layer-skip", "--model", path, "--output", str(output), "--num-tokens", "64",
                 "--dtype", "float32", "--no-progress"]) == 0
    saved = json.loads(output.read_text())
    assert saved["num_layers"] == 3 and 0 < len(saved["skip_layers"]) < 3 and 0 <= saved["agreement"] <= 1
    config = {"method": "layer_skip", "skip_layers_file": str(output), "draft_p_min": 0.0}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = _prompts()
    expected = _tokens(LLM(path, dtype="float32", block_size=4), prompts, params)
    spec = LLM(path, dtype="float32", block_size=4, speculative_config=config)
    assert _tokens(spec, prompts, params) == expected
    assert spec.engine.scheduler.spec_stats.num_draft_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma", "qwen"])
def test_real_gguf_greedy_is_unchanged(model):
    """The default model and Qwen2.5-Coder 0.5B (GGUF weights kept quantized), float32 compute: ngram,
    the model drafting for itself (a real draft model's path through its own KV cache) and layer skip."""
    from ember.model_zoo import default_model_path, qwen25_coder_05b_path

    path = {"gemma": default_model_path, "qwen": qwen25_coder_05b_path}[model]()
    code = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
    prompts = [f"Rewrite this code with type hints.\n\n{code}\nRewritten:\n", "The capital of France is"]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    settings = {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 4, "kv_cache_memory": 0.5}
    plain = LLM(path, **settings)
    expected = _tokens(plain, prompts, params)
    layers = plain.engine.model_config.num_hidden_layers
    del plain
    configs = [
        NGRAM,
        {"method": "draft_model", "model": path, "num_speculative_tokens": 3},
        {"method": "layer_skip", "skip_layers": list(range(1, layers - 1, 3)), "num_speculative_tokens": 3,
         "draft_p_min": 0.0},
    ]
    for config in configs:
        spec = LLM(path, **settings, speculative_config=config)
        assert _tokens(spec, prompts, params) == expected, config["method"]
        stats = spec.engine.scheduler.spec_stats
        assert stats.num_draft_tokens > 0, config["method"]
        if config["method"] != "layer_skip":  # skipping a third of a small model's layers rarely agrees
            assert stats.num_accepted_tokens > 0, config["method"]
        assert_no_leak(spec.engine)
        del spec
