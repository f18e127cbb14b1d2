"""Perplexity and KLD: the window rule, agreement with transformers and with a brute-force per-token
computation, KLD of a model against itself, and llama.cpp against ember on the default GGUF."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from checkpoints import CORPUS
from ember.eval.kld import kld_live, kld_saved, save_reference
from ember.eval.perplexity import perplexity
from ember.eval.scoring import EmberScorer
from ember.eval.text import WindowPlan, tokenize_text
from ember.eval.windows import limit_windows, plan_windows

CTX, STRIDE = 16, 6


@pytest.mark.parametrize("n,length,stride", [(2, 2, 1), (10, 4, 3), (37, 16, 6), (37, 16, 15), (100, 17, 5), (16, 16, 3)])
def test_every_token_scored_once_with_enough_context(n, length, stride):
    windows = plan_windows(n, length, stride)
    scored = [i for w in windows for i in range(w.first_target, w.end)]
    assert scored == list(range(1, n))
    for index, w in enumerate(windows):
        assert w.begin == index * stride and w.end - w.begin <= length
        if index:  # tokens after the first window see at least length - stride tokens before them
            assert w.first_target - w.begin >= length - stride
    assert windows[-1].end == n


def test_limit_is_a_prefix_of_the_full_run():
    windows = plan_windows(100, 17, 5)
    limited = limit_windows(windows, 30)
    scored = [i for w in limited for i in range(w.first_target, w.end)]
    assert scored == list(range(1, 31))


@pytest.fixture(scope="module")
def llama(checkpoint_dir):
    folder = checkpoint_dir("llama")
    scorer = EmberScorer(folder, CTX, dtype="float32")
    tokens = tokenize_text(scorer.tokenizer, " ".join(CORPUS * 3))
    return folder, scorer, tokens


def test_perplexity_equals_transformers(llama):
    folder, scorer, tokens = llama
    plan = WindowPlan.build(tokens, None, CTX, STRIDE, None)
    ours = perplexity(scorer, plan, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # The usual Hugging Face strided loop, written independently: labels of the overlap are ignored.
    nll, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(tokens), STRIDE):
        end = min(begin + CTX, len(tokens))
        new = end - max(previous_end, begin + 1)
        ids = torch.tensor([tokens[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(ref(ids).logits[0].float(), -1)
        targets = ids[0, 1:]
        per_token = -logp[:-1].gather(-1, targets[:, None]).squeeze(-1)
        nll += per_token[-new:].double().sum().item()
        count += new
        previous_end = end
        if end == len(tokens):
            break
    assert ours.num_tokens == count == len(tokens) - 1
    assert ours.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("bos", [False, True])
def test_strided_windows_equal_brute_force(llama, bos):
    """Each token scored from its own forward over exactly the context the rule gives it."""
    _, scorer, tokens = llama
    tokens = tokens[:60]
    bos_id = 1 if bos else None
    plan = WindowPlan.build(tokens, bos_id, CTX, STRIDE, None)
    windowed = perplexity(scorer, plan, progress=False)
    length = CTX - (1 if bos else 0)
    nll = 0.0
    for i in range(1, len(tokens)):
        w = max(0, -(-(i - length + 1) // STRIDE))  # first window (start w * stride) whose end is past i
        context = ([bos_id] if bos else []) + tokens[w * STRIDE : i]
        logits = next(scorer.logits(context, range(len(context) - 1, len(context))))
        nll -= torch.log_softmax(logits[0], -1)[tokens[i]].item()
    assert windowed.num_tokens == len(tokens) - 1
    assert windowed.mean_nll == pytest.approx(nll / (len(tokens) - 1), rel=1e-5)


def test_kld_of_a_model_against_itself_is_zero(llama, checkpoint_dir, tmp_path):
    folder, scorer, tokens = llama
    plan = WindowPlan.build(tokens, None, CTX, STRIDE, 80)
    other = EmberScorer(folder, CTX, dtype="float32")
    live = kld_live(scorer, other, plan, progress=False)
    assert live.exact and live.num_tokens == 80
    assert abs(live.mean_kld) < 1e-6 and live.p99_kld < 1e-5
    assert live.top1_agreement == 1.0 and live.delta_ppl_pct == pytest.approx(0.0, abs=1e-4)
    path = str(tmp_path / "ref.pt")
    ppl = save_reference(other, plan, path, top_k=8, progress=False)
    saved = kld_saved(scorer, path, progress=False)
    assert not saved.exact and saved.num_tokens == 80
    assert saved.mean_kld < 1e-6 and saved.top1_agreement == 1.0
    assert saved.ppl_reference == pytest.approx(ppl, rel=1e-6) == pytest.approx(live.ppl_reference, rel=1e-5)


def test_saved_reference_bounds_the_exact_kld(checkpoint_dir, tmp_path):
    """Against a different model the top-K bucket KLD is a lower bound of the exact one, and equal when
    K covers the whole vocabulary."""
    model = EmberScorer(checkpoint_dir("llama"), CTX, dtype="float32")
    reference = EmberScorer(checkpoint_dir("qwen2"), CTX, dtype="float32")  # same tokenizer and vocabulary
    tokens = tokenize_text(model.tokenizer, " ".join(CORPUS))
    plan = WindowPlan.build(tokens, None, CTX, STRIDE, 40)
    exact = kld_live(model, reference, plan, progress=False)
    assert exact.mean_kld > 0.01
    for k, relation in ((16, "le"), (model.vocab_size, "eq")):
        path = str(tmp_path / f"ref{k}.pt")
        save_reference(reference, plan, path, top_k=k, progress=False)
        bound = kld_saved(model, path, progress=False)
        assert bound.top1_agreement == pytest.approx(exact.top1_agreement)
        assert bound.ppl_reference == pytest.approx(exact.ppl_reference, rel=1e-5)
        if relation == "le":
            assert bound.mean_kld <= exact.mean_kld + 1e-7
        else:
            assert bound.mean_kld == pytest.approx(exact.mean_kld, rel=1e-4)
