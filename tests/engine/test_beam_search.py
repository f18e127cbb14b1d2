"""Beam search inside the engine: token for token what transformers' `generate(num_beams=...)` returns, with
the beams of a request sharing KV blocks (forked copy-on-write, pruned at once) and batching with others."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest
import torch
import transformers
from helpers import assert_no_leak

from ember import LLM, BeamSearchParams, SamplingParams
from ember.errors import InvalidRequestError
from ember.model_zoo import default_model_path

PROMPTS = [[1, 17, 42, 99, 7], [1, 300, 5, 8, 64, 128, 12, 77, 3]]
# (beam_width, length_penalty, early_stopping, max_tokens)
CASES = [
    (2, 1.0, False, 12),
    (3, 0.5, True, 10),
    (4, 2.0, "never", 9),
    (4, -1.0, False, 14),
    (3, 0.0, "never", 11),
    (5, 1.0, True, 8),
]


def _with_eos(folder: str, dest: str, eos: int) -> str:
    """The checkpoint with `eos` as its end-of-sequence token, so beams finish at different lengths (a tiny
    random model rarely writes the real one)."""
    if not os.path.exists(dest):
        shutil.copytree(folder, dest)
        for name in ("config.json", "generation_config.json"):
            path = os.path.join(dest, name)
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            config["eos_token_id"] = eos
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f)
    return dest


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def models(request, checkpoint_dir, tmp_path_factory):
    """(ember LLM, transformers model, eos ids) on a checkpoint whose EOS is the token most often among greedy
    decoding's top 3 (a tiny random model's distributions are nearly flat: that EOS competes at every step)."""
    folder = checkpoint_dir(request.param)
    probe = LLM(folder, dtype="float32", max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    completions = [output.outputs[0] for output in probe.generate(PROMPTS, params, use_tqdm=False)]
    eos = Counter(t for c in completions for top in c.logprobs for t in top).most_common(1)[0][0]
    folder = _with_eos(folder, str(tmp_path_factory.mktemp("eos") / request.param), eos)
    llm = LLM(folder, dtype="float32", max_model_len=128, block_size=16)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return llm, reference, llm.engine.eos_token_ids


def _transformers_beams(reference, prompt, eos, width, length_penalty, early_stopping, max_tokens):
    out = reference.generate(
        torch.tensor([prompt]), num_beams=width, num_return_sequences=width, max_new_tokens=max_tokens,
        length_penalty=length_penalty, early_stopping=early_stopping, do_sample=False, eos_token_id=eos,
        pad_token_id=0, return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    if width == 1:
        return [out.sequences[0, len(prompt) :].tolist()], None
    lengths = (out.beam_indices != -1).sum(-1).tolist()
    hypotheses = [out.sequences[i, len(prompt) : len(prompt) + lengths[i]].tolist() for i in range(width)]
    return hypotheses, out.sequences_scores.tolist()


@pytest.mark.parametrize("width, length_penalty, early_stopping, max_tokens", CASES)
def test_beam_search_equals_transformers(models, width, length_penalty, early_stopping, max_tokens):
    llm, reference, eos = models
    params = BeamSearchParams(width, max_tokens, length_penalty=length_penalty, early_stopping=early_stopping)
    outputs = llm.beam_search(PROMPTS, params, use_tqdm=False)
    finished_early = 0
    for prompt, output in zip(PROMPTS, outputs):
        tokens, scores = _transformers_beams(reference, prompt, eos, width, length_penalty, early_stopping, max_tokens)
        assert [c.token_ids for c in output.outputs] == tokens
        assert [c.score for c in output.outputs] == pytest.approx(scores, rel=1e-4, abs=1e-4)
        finished_early += sum(c.finish_reason == "stop" for c in output.outputs)
        for c in output.outputs:
            assert c.finish_reason == ("stop" if c.token_ids[-1] in eos else "length")
    if length_penalty <= 0.5:  # short hypotheses win there: the EOS was reached, early stopping took part
        assert finished_early
    assert_no_leak(llm.engine)


def test_width_one_is_greedy(models):
    llm, _, _ = models
    beam = llm.beam_search(PROMPTS[1], BeamSearchParams(1, 10, ignore_eos=True), use_tqdm=False)[0]
    greedy = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert beam.outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_forks_share_blocks_and_pruned_beams_free_theirs(models):
    """Mid-search, the beams' tables share every block of the prompt and of their common history; the pool's
    used blocks are exactly the union of the live beams' tables (a pruned beam's blocks are back at once)."""
    llm, _, _ = models
    engine = llm.engine
    prompt = list(range(3, 43))  # 40 tokens: 2 full blocks and a partial one
    engine.add_request("beams", prompt, BeamSearchParams(4, 30, ignore_eos=True))
    group = engine.output_processor.groups["beams"]
    saw_sharing = False
    while engine.has_unfinished_requests():
        engine.step()
        for manager in engine.kv_manager.managers:
            tables = [manager.tables[m.request_id].block_ids for m in group.members if m.request_id in manager.tables]
            used = {b for table in tables for b in table if b != 0}
            assert manager.num_blocks - manager.num_free_blocks == len(used)
            if len(tables) == 4 and manager.window is None:
                assert len({table[0] for table in tables}) == 1 and len({table[1] for table in tables}) == 1
                saw_sharing |= len(used) < sum(len(table) for table in tables)
    assert saw_sharing
    assert_no_leak(engine)


def test_beams_batch_with_other_requests(models):
    """A greedy request decoding next to beam searches gets the tokens it gets alone, and the beams theirs."""
    llm, _, _ = models
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].token_ids
    beam_params = BeamSearchParams(3, 10, length_penalty=0.5)
    beams_alone = [c.token_ids for c in llm.beam_search(PROMPTS[0], beam_params, use_tqdm=False)[0].outputs]
    engine = llm.engine
    engine.add_request("beam-a", PROMPTS[0], beam_params)
    engine.add_request("greedy", PROMPTS[1], params)
    engine.add_request("beam-b", PROMPTS[0], beam_params)
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
    assert done["greedy"].outputs[0].token_ids == alone
    assert [c.token_ids for c in done["beam-a"].outputs] == beams_alone
    assert [c.token_ids for c in done["beam-b"].outputs] == beams_alone
    assert_no_leak(engine)


def test_preemption_and_a_small_pool_give_the_same_beams(models, checkpoint_dir):
    """With room for few sequences, forks wait and recompute, and members are preempted: same result."""
    llm, _, _ = models
    folder = llm.engine.config.model
    params = BeamSearchParams(4, 20, length_penalty=1.0)
    expected = [[c.token_ids for c in o.outputs] for o in llm.beam_search(PROMPTS, params, use_tqdm=False)]
    small = LLM(folder, dtype="float32", max_model_len=64, block_size=16, max_num_seqs=5, kv_cache_tokens=96)
    got = [[c.token_ids for c in o.outputs] for o in small.beam_search(PROMPTS, params, use_tqdm=False)]
    assert got == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert_no_leak(small.engine)


def test_abort_mid_search_frees_everything(models):
    llm, _, _ = models
    engine = llm.engine
    engine.add_request("doomed", PROMPTS[0], BeamSearchParams(4, 30, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert len(engine.output_processor.groups["doomed"].members) == 4
    engine.abort_request("doomed")
    engine.step()  # the runner drops the beams' state
    assert_no_leak(engine)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beam_width": 0, "max_tokens": 4}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
        ({"beam_width": 2, "max_tokens": 4, "early_stopping": "sometimes"}, "early_stopping"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, "length_penalty"),
        ({"beam_width": 2, "max_tokens": 4, "temperature": -1.0}, "temperature"),
    ],
)
def test_bad_beam_params(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        BeamSearchParams(**kwargs)


def test_too_long_is_rejected_before_queueing(models):
    llm, _, _ = models
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.beam_search(PROMPTS[0], BeamSearchParams(2, 500), use_tqdm=False)
    assert_no_leak(llm.engine)


@pytest.mark.slow
def test_default_model_beam_search_equals_transformers():
    """The default GGUF in float32 (weights dequantized as transformers loads them), each early-stopping mode."""
    path = default_model_path()
    folder, name = os.path.split(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", quantization="none", max_model_len=256)
    eos = llm.engine.eos_token_ids
    cases = [("The capital of France is", 3, 1.0, False, 12), ("def fibonacci(n):", 4, 0.5, True, 10),
             ("Once upon a time", 2, 2.0, "never", 8)]  # fmt: skip
    for prompt, width, length_penalty, early_stopping, max_tokens in cases:
        params = BeamSearchParams(width, max_tokens, length_penalty=length_penalty, early_stopping=early_stopping)
        for output in llm.beam_search(prompt, params, use_tqdm=False):
            with torch.no_grad():
                tokens, scores = _transformers_beams(
                    reference, output.prompt_token_ids, eos, width, length_penalty, early_stopping, max_tokens
                )
            assert [c.token_ids for c in output.outputs] == tokens
            assert [c.score for c in output.outputs] == pytest.approx(scores, rel=1e-3, abs=1e-3)
    assert_no_leak(llm.engine)
