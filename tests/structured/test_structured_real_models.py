"""Structured output on the real GGUF models' tokenizers (the default model's SPM byte-fallback vocabulary,
Qwen2.5-Coder's byte-level BPE): the raw-byte vocabulary given to xgrammar spells every token as the
tokenizer decodes it. (The 32-schema generation suite of tests/structured/schemas.py on both models is not
in the suite yet: it has not been run on this machine, whose CPU lacks the AVX-512 the kernels need.)"""

from __future__ import annotations

import pytest

from ember.model_zoo import default_model_path, qwen25_coder_05b_path
from ember.structured.backend import raw_vocabulary
from ember.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

MODELS = {"gemma": default_model_path, "qwen": qwen25_coder_05b_path}
TEXTS = ["Hello, world!", "  leading spaces\tand tabs\n", "naïve café 東京 🙂", '{"a": [1, 2.5e-3, null]}', "x" * 40]


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> str:
    return request.param


def test_raw_vocabulary_spells_tokens_as_decoded(model):
    """xgrammar sees each token's bytes; joined over an encoding they must give the text back."""
    tokenizer = Tokenizer.from_pretrained(MODELS[model]())
    vocab = raw_vocabulary(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(vocab[i] for i in ids) == text.encode(), text
    assert all(vocab[i] == b"" for i in tokenizer.all_special_ids)
