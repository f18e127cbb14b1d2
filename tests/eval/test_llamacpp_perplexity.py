"""llama.cpp and ember score the same tokens of the default GGUF to within a small relative perplexity
difference (two windows of PTB test at ctx 512, kept short)."""

from __future__ import annotations

import pytest

from ember.eval.perplexity import perplexity
from ember.eval.scoring import EmberScorer, LlamaCppScorer, uses_bos
from ember.eval.text import WindowPlan, load_text, tokenize_text
from ember.model_zoo import default_model_path

CTX = 512
TOKENS = 766  # the first window scores 510 tokens (511 text tokens after BOS), the second 256

# Measured on Gemma 3 270M Q4_K_M: ember (weights dequantized, float32) 83.70, llama.cpp 84.59 (+1.05%).
# llama.cpp rounds activations to 8 bits (Q8_K) for its integer dot products and keeps K/V in f16, so the
# two are not expected to agree exactly; 2.5% leaves room for build/CPU differences while a wrong window,
# BOS or row offset moves the perplexity by far more (tens of percent).
TOLERANCE = 0.025


@pytest.mark.slow
def test_llamacpp_agrees_with_ember_on_the_default_gguf():
    pytest.importorskip("llama_cpp")
    path = default_model_path()
    ember_scorer = EmberScorer(path, CTX, dtype="float32", quantization="none")
    tokens = tokenize_text(ember_scorer.tokenizer, load_text("ptb-test"))
    bos = ember_scorer.tokenizer.bos_token_id if uses_bos(ember_scorer.tokenizer) else None
    plan = WindowPlan.build(tokens, bos, CTX, None, TOKENS)
    assert len(plan.windows) == 2 and plan.num_targets == TOKENS
    ours = perplexity(ember_scorer, plan, progress=False)
    del ember_scorer
    theirs = perplexity(LlamaCppScorer(path, CTX), plan, progress=False)
    assert theirs.num_tokens == ours.num_tokens == TOKENS
    assert abs(theirs.ppl / ours.ppl - 1) < TOLERANCE, (ours.ppl, theirs.ppl)
