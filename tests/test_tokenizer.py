"""ember's Tokenizer against transformers (the reference): ids, decoding, streaming, chat templates."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from ember.errors import InvalidRequestError, ModelNotFoundError
from ember.model_zoo import default_model_path, qwen25_coder_05b_path
from ember.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

MODELS = {"gemma": default_model_path, "qwen": qwen25_coder_05b_path}

PIECES = [
    # words, accents, scripts
    "Hello", "world", "The quick brown fox jumps over the lazy dog.", "café", "naïve", "Ångström", "façade",
    "jalapeño", "e\u0301", "ﬁne", "中文", "日本語のテキスト", "한국어 문장", "𠜎𠜱𠝹𠱓", "鿰", "مرحبا بالعالم", "العربية",
    "Привет, мир", "Ελληνικά", "हिन्दी", "ภาษาไทย", "עברית", "Ⅻ", "ǅ", "ß", "İstanbul",
    # emoji: plain, skin tones, ZWJ sequences, flags, variation selectors, recent ones
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🧑🏿‍🚀", "🇫🇷", "🇯🇵🇺🇸", "❤️", "🫠", "🪿", "🫨", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    # whitespace runs
    " ", "  ", "   ", "        ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u200b",
    # code
    "def f(x):\n    return x * 2\n", "class A:\n\tpass\n", "for i in range(10):\n        print(i, end='')",
    "if (a && b) { return -1; }", "x = [1, 2, 3]  # list", "import os, sys", "    ", "```python\nprint('hi')\n```",
    "<div class=\"a\">&amp;</div>", "SELECT * FROM t WHERE id=42;", "λx.x", "a->b", "i++;", "#include <stdio.h>",
    # numbers
    "0", "42", "3.14159", "1,000,000", "-7e10", "2024-01-01", "123456789012", "0x1F", "½",
    # special tokens inside text
    "<start_of_turn>user", "<start_of_turn>model\n", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<eos>",
    "<bos>", "<|endoftext|>", "<tool_call>", "<unused0>", "<pad>", "<mask>", "<start_of_image>", "<|im_start|>user\n",
    "< |im_start| >", "<start_of_turn",
    # punctuation and contractions
    "'s", "don't", "I'm", "WE'LL", "http://example.com/a?b=c&d=e", "a@b.co", "$100", "50%", "...", "—", "«»",
    "¿¡", "™", "!!!", "???", "''", '"quoted"',
]  # fmt: skip
SEPARATORS = ["", "", " ", " ", "  ", "\n", "\t", " \n", "\n\n"]


def make_texts(count: int = 3000, seed: int = 1234) -> list[str]:
    """Deterministic mixes of the pieces above, plus every piece alone and the empty string."""
    rng = random.Random(seed)
    texts = ["", *PIECES]
    for _ in range(count):
        parts = rng.choices(PIECES, k=rng.randint(1, 7))
        text = "".join(part + rng.choice(SEPARATORS) for part in parts)
        if rng.random() < 0.2:
            text = rng.choice([" ", "  ", "\n", "\t"]) + text
        if rng.random() < 0.2:
            text = text.rstrip() if rng.random() < 0.5 else text + rng.choice([" ", "   ", "\n"])
        texts.append(text)
    return texts


TEXTS = make_texts()


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request) -> tuple[str, Tokenizer, object]:
    """(name, ember tokenizer, transformers tokenizer) for each real GGUF, loaded once per module."""
    path = MODELS[request.param]()
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return request.param, Tokenizer.from_pretrained(path), hf


def _mismatches(texts: list[str], ours: list, ref: list) -> list:
    return [(t, a, b) for t, a, b in zip(texts, ours, ref, strict=True) if a != b]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_parity(pair, add_special_tokens: bool) -> None:
    name, tok, hf = pair
    ours = tok.encode_batch(TEXTS, add_special_tokens=add_special_tokens)
    ref = hf(TEXTS, add_special_tokens=add_special_tokens)["input_ids"]
    bad = _mismatches(TEXTS, ours, ref)
    assert not bad, f"{name}: {len(bad)}/{len(TEXTS)} mismatches, e.g. {bad[:3]}"
    # `encode` one at a time gives the same ids as the batch path.
    for text, ids in zip(TEXTS[::25], ours[::25]):
        assert tok.encode(text, add_special_tokens=add_special_tokens) == ids


def test_decode_parity(pair) -> None:
    name, tok, hf = pair
    subset = TEXTS[::5]
    for text in subset:
        ids = hf(text)["input_ids"]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), (name, text)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), (name, text)


def test_special_ids_and_sizes(pair) -> None:
    name, tok, hf = pair
    assert tok.vocab_size == len(hf)
    assert tok.bos_token_id == hf.bos_token_id
    assert tok.eos_token_ids[0] == hf.eos_token_id == tok.eos_token_id
    assert tok.pad_token_id == hf.pad_token_id
    assert set(hf.all_special_ids) <= tok.all_special_ids
    # all_special_ids is what decode(skip_special_tokens=True) drops
    sample = sorted(tok.all_special_ids)[:50]
    assert tok.decode(sample) == ""
    assert tok.convert_ids_to_tokens([tok.bos_token_id]) == [hf.bos_token]
    if name == "gemma":
        assert tok.encode("") == [2] and tok.eos_token_ids == [1, 106]
    else:
        assert tok.encode("") == [] and tok.eos_token_ids == [151645, 151643]


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def test_token_bytes_concatenate_to_the_text(pair) -> None:
    _, tok, _ = pair
    for text in make_texts(200, seed=7):
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8") == tok.decode(ids, skip_special_tokens=False), text


def test_streaming_matches_full_decode(pair) -> None:
    name, tok, _ = pair
    prompt = tok.encode("Answer briefly: ")
    split_chars = 0  # tokens that are only part of a character (byte fallback / partial UTF-8)
    for text in TEXTS[::10]:
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        deltas = _stream(tok, prompt, ids)
        assert "".join(deltas) == full, (name, text)
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), (name, text, deltas)
        split_chars += sum("\ufffd" in tok.decode([i]) for i in ids)
        assert "".join(_stream(tok, [], ids, skip=False)) == tok.decode(ids, skip_special_tokens=False)
    assert split_chars > 50, f"{name}: the sample must exercise characters split across tokens"


def test_streaming_holds_back_split_characters(pair) -> None:
    name, tok, _ = pair
    ids = tok.encode("tail 𠜎 and 🪿 end", add_special_tokens=False)
    deltas = _stream(tok, tok.encode("x"), ids)
    assert "".join(deltas) == "tail 𠜎 and 🪿 end"
    assert "" in deltas[:-1], f"{name}: some token should have been held back"
    assert all("\ufffd" not in d for d in deltas)


def test_streaming_flush_releases_incomplete_bytes(pair) -> None:
    _, tok, _ = pair
    ids = tok.encode("ok 𠜎", add_special_tokens=False)[:-1]  # stop in the middle of the character
    deltas = _stream(tok, [], ids)
    assert deltas[-1] and "\ufffd" in deltas[-1]
    assert "".join(deltas) == tok.decode(ids)


class _DecodeSpy:
    """Wraps a tokenizer and records the longest id list decoded."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.all_special_ids, self.longest = tok, tok.all_special_ids, 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_streaming_work_per_token_is_bounded(pair) -> None:
    _, tok, _ = pair
    text = " ".join(TEXTS[1:200])
    ids = tok.encode(text, add_special_tokens=False)
    spy = _DecodeSpy(tok)
    detok = IncrementalDetokenizer(spy, tok.encode("prompt " * 100), skip_special_tokens=True)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == tok.decode(ids)
    assert len(ids) > 1000 and spy.longest <= 16


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful coding assistant."},
        {"role": "user", "content": "Write hello world in Python."},
        {"role": "assistant", "content": "```python\nprint('Hello, world!')\n```"},
    ],
    [{"role": "user", "content": "Héllo 👋 <|im_start|> tabs\tand\nnewlines"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?", "name": None},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, add_generation_prompt: bool) -> None:
    name, tok, hf = pair
    if name == "gemma":
        with pytest.raises(InvalidRequestError, match="has no chat template"):
            tok.apply_chat_template(CONVERSATIONS[0])
        return
    for messages in CONVERSATIONS:
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_errors_are_request_errors(pair) -> None:
    _, tok, _ = pair
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template) == "ok"
    with pytest.raises(InvalidRequestError, match="first must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], chat_template=template)
    with pytest.raises(InvalidRequestError):  # the sandbox forbids mutating data
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages.append(1) }}")
    with pytest.raises(InvalidRequestError):  # not jinja2
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% if %}")
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template([], chat_template=template)


def test_chat_template_helpers_match_transformers(pair) -> None:
    """tojson without HTML escaping, the {% generation %} tag, loop controls, bos_token/eos_token."""
    _, tok, hf = pair
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{{ eos_token }}\n{% endfor %}"
        "{{ tools | tojson(indent=2) }}"
    )
    messages = [{"role": "user", "content": "<b>é</b> & 😀"}, {"role": "skip", "content": "x"}]
    tools = [{"name": "f", "parameters": {"a": "<int>"}}]
    ours = tok.apply_chat_template(messages, chat_template=template, tools=tools)
    assert ours == hf.apply_chat_template(messages, chat_template=template, tools=tools, tokenize=False)
    assert "<b>é</b> & 😀" in ours


# --- a Hugging Face folder -------------------------------------------------------------------------

HF_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "{% if message['role'] == 'system' %}\n"
    "<|system|>{{ message['content'] | trim }}\n"
    "{% else %}\n"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; models read the pieces.",
    "def add(a, b):\n    return a + b",
    "Café crème, naïve façade, 中文 and émojis 😀!",
] * 20


@pytest.fixture(scope="module", params=["add_bos", "no_bos", "legacy"])
def hf_folder(request, tmp_path_factory) -> Path:
    """A small byte-level BPE trained here, saved by transformers like a model repo's tokenizer.

    "legacy" rewrites the files the way older repos have them: the template and add_bos_token in
    tokenizer_config.json (transformers v5 ignores the flag when tokenizer.json exists), special
    tokens in special_tokens_map.json, one of them ("<pad>") not in the vocabulary at all.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(SENTENCES, trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        add_bos_token=request.param == "add_bos",
    )
    hf.chat_template = HF_TEMPLATE
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    if request.param == "legacy":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.update(chat_template=HF_TEMPLATE, add_bos_token=True)
        special = {name: config.pop(name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        special["pad_token"] = {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "special_tokens_map.json").write_text(json.dumps(special))
        (folder / "chat_template.jinja").unlink()
    return folder


def test_hf_folder_matches_transformers(hf_folder: Path) -> None:
    tok = Tokenizer.from_pretrained(str(hf_folder))
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    texts = TEXTS[:300] + SENTENCES[:4] + ["<s>hi</s>", "<|user|>x", "a<pad>b"]
    for add_special_tokens in (True, False):
        ours = tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        assert ours == hf(texts, add_special_tokens=add_special_tokens)["input_ids"]
    for text in texts[::7] + texts[-3:]:
        ids = hf(text)["input_ids"]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert tok.bos_token_id == hf.bos_token_id == 1
    assert tok.eos_token_ids == [2, 5] and tok.pad_token_id == hf.pad_token_id
    assert tok.vocab_size == len(hf)
    assert tok.chat_template == hf.chat_template == HF_TEMPLATE
    for messages in [CONVERSATIONS[0], CONVERSATIONS[2]]:
        for add_generation_prompt in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == (
                hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            )


def test_missing_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_pretrained(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
