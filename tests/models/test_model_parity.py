"""Every family matches transformers on the same weights: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from ember import LLM, SamplingParams
from ember.loader.model_loader import load_model, resolve_model
from helpers import batch_logits

PROMPT_LENGTHS = (20, 5, 33, 1, 17)  # several longer than the tiny Gemma's window of 8


def _prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 500, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def reference(checkpoint_dir, family):
    folder = checkpoint_dir(family)
    return folder, transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_logits_match_transformers(reference):
    folder, ref = reference
    model = load_model(resolve_model(folder), torch.float32, "cpu")
    prompts = _prompts()
    ours = batch_logits(model, prompts)
    for prompt, logits in zip(prompts, ours):
        with torch.no_grad():
            expected = ref(torch.tensor([prompt])).logits[0].float()
        assert (logits - expected).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers(reference):
    folder, ref = reference
    llm = LLM(folder, dtype="float32")
    prompts = _prompts(seed=1)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, min_tokens=32), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = ref.generate(
                torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert output.outputs[0].token_ids == expected
