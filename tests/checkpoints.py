"""Tiny random-weight checkpoints of each supported family, saved as real HF folders
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json) with transformers."""

from __future__ import annotations

import os

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Hello world! Ember runs language models on the CPU.",
    "Paged attention, prefix caching and chunked prefill make serving fast.",
    "numbers 0123456789 and symbols ()[]{}<>=+-*/",
]

FAMILIES = ["gemma3", "llama", "qwen2", "qwen3", "mistral"]
VOCAB = 512


def _config(family: str):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **common, head_dim=32, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24, final_logit_softcapping=30.0,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
        )
    if family == "llama":
        return tf.LlamaConfig(
            **common, head_dim=16, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32)
    if family == "mistral":
        return tf.MistralConfig(**common, head_dim=16, sliding_window=12)
    raise ValueError(family)


def save_tokenizer(folder: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    fast.save_pretrained(folder)


def build_checkpoint(family: str, folder: str, seed: int = 0) -> str:
    """Write a random-weight `family` checkpoint to `folder` (once) and return the folder."""
    import transformers as tf

    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    torch.manual_seed(seed)
    config = _config(family)
    model_cls = tf.Gemma3ForCausalLM if family == "gemma3" else tf.AutoModelForCausalLM
    model = model_cls.from_config(config) if model_cls is tf.AutoModelForCausalLM else model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial norm weights, so a wrong norm formula shows
                p.normal_(0.0 if family == "gemma3" else 1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder
