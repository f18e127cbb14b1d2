"""The real GGUF models (default Gemma 3 270M, and Qwen2.5-Coder 0.5B) against transformers loading the
same file: identical greedy tokens and first-position logits within 1e-3 relative, in float32."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from ember import LLM, SamplingParams
from ember.model_zoo import default_model_path, qwen25_coder_05b_path
from helpers import batch_logits

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "Über die Brücke 🌉 gingen",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n",
]


@pytest.fixture(scope="module", params=["gemma3-270m", "qwen2.5-coder-0.5b"])
def models(request):
    path = default_model_path() if request.param == "gemma3-270m" else qwen25_coder_05b_path()
    folder, name = os.path.split(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return LLM(path, dtype="float32", quantization="none"), reference, ref_tokenizer


def test_greedy_tokens_and_logits_match_transformers(models):
    llm, reference, ref_tokenizer = models
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    first_logits = batch_logits(llm.engine.runner.model, [o.prompt_token_ids for o in outputs])
    for prompt, output, logits in zip(PROMPTS, outputs, first_logits):
        ids = ref_tokenizer(prompt)["input_ids"]
        assert output.prompt_token_ids == ids
        with torch.no_grad():
            expected_logits = reference(torch.tensor([ids])).logits[0, -1].float()
            expected = reference.generate(
                torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False
            )[0, len(ids) :].tolist()
        relative = (logits[-1] - expected_logits).abs().max() / expected_logits.abs().max()
        assert relative.item() <= 1e-3
        assert output.outputs[0].token_ids == expected, prompt
