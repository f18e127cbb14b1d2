"""Build a `tokenizers.Tokenizer` from the vocabulary a GGUF file stores.

A GGUF has no `tokenizer.json`: it keeps the tokens, their scores and types, the merges (byte-level
BPE only) and the special token ids as llama.cpp metadata. We rebuild the same tokenizer that
transformers builds from that metadata (our reference for token ids):

* `llama` (SentencePiece vocabulary) is rebuilt as a BPE with byte fallback whose merges are derived
  from the vocabulary. Gemma files get Gemma's shape (spaces normalized to "▁", merges ranked by the
  position of the merged token in the file); other architectures get Llama's (Metaspace, ranked by
  score).
* `gpt2` is a byte-level BPE with the file's merges, split first by the regex `tokenizer.ggml.pre`
  names (e.g. Qwen2's).

Control tokens become special added tokens and user-defined tokens plain added tokens, so that text
like "<start_of_turn>" or "<|im_start|>" encodes to a single id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ember.errors import CorruptModelError, UnsupportedModelError
from ember.loader.gguf_file import GGUFFile

# llama.cpp token types (gguf.TokenType), as stored in `tokenizer.ggml.token_type`.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Architectures whose SentencePiece vocabulary follows Gemma's conventions (as in transformers).
_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3", "gemma3n"}

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`; the same patterns transformers uses.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "lfm2"], _LLAMA3_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4"], _GPT4O_SPLIT),
}

# Control tokens that end a turn. llama.cpp stops generation on these as well as on EOS (its
# "end of generation" set), which is what the models' generation_config.json lists.
_END_OF_TURN = {
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "<end_of_utterance>", "<|return|>", "<|call|>",
}  # fmt: skip

def build_gguf_tokenizer(source: GGUFFile | Mapping[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer a GGUF describes, and its special-token info.

    `source` is an open `GGUFFile` or its `metadata` mapping (plain Python values by GGUF key).
    The info dict has `bos_token_id`, `eos_token_id`, `unk_token_id`, `pad_token_id` (int or None),
    `eos_token_ids` (EOS plus end-of-turn ids), `add_bos`, `add_eos` and `chat_template`.
    """
    meta = source.metadata if isinstance(source, GGUFFile) else source
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model not in ("llama", "gpt2"):
        raise UnsupportedModelError(
            f"GGUF tokenizer model {model!r} is not supported; ember supports 'llama' (SentencePiece) "
            "and 'gpt2' (byte-level BPE) vocabularies"
        )
    if not tokens:
        raise CorruptModelError("GGUF has no tokenizer.ggml.tokens vocabulary")
    tokens = list(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    arch = meta.get("general.architecture")

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    ids = {
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "unk_token_id": token_id("unknown_token_id"),
        "pad_token_id": token_id("padding_token_id"),
    }
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))  # llama.cpp's default
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    if model == "gpt2":
        tokenizer = _byte_level_bpe(tokens, meta)
    elif arch in _GEMMA_ARCHS:
        tokenizer = _gemma_bpe(tokens, ids["unk_token_id"])
    else:
        tokenizer = _llama_bpe(tokens, meta)

    _add_special_tokens(tokenizer, tokens, types, model == "gpt2", ids)
    tokenizer.post_processor = _bos_eos_template(tokens, ids, add_bos, add_eos)

    eos_ids = [ids["eos_token_id"]] if ids["eos_token_id"] is not None else []
    for extra in (token_id("eot_token_id"), token_id("eom_token_id")):
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == CONTROL and token in _END_OF_TURN and i not in eos_ids:
            eos_ids.append(i)

    info = dict(ids, eos_token_ids=eos_ids, add_bos=add_bos, add_eos=add_eos,
                chat_template=meta.get("tokenizer.chat_template"))  # fmt: skip
    return tokenizer, info


def _gemma_bpe(tokens: list[str], unk_id: int | None) -> Tokenizer:
    """Gemma's SentencePiece as a BPE: spaces become "▁" in a normalizer, byte fallback.

    Gemma files store tokens made only of spaces as real spaces; the model looks them up as "▁"s,
    so they are respelled. There are no merges in the file: every split of a token into two vocab
    tokens is a merge, ranked by the merged token's position in the file (Gemma's scores do not
    follow its merge order), longer left part first.
    """
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: i for i, token in enumerate(spelled)}
    merges = []
    for i, token in enumerate(spelled):
        if vocab[token] != i:  # a duplicate spelling: only its last id is in the vocab
            continue
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=spelled[unk_id] if unk_id is not None else "<unk>",
            fuse_unk=True, byte_fallback=True, dropout=None)
    )  # fmt: skip
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def _llama_bpe(tokens: list[str], meta: Mapping[str, Any]) -> Tokenizer:
    """Llama-style SentencePiece as a BPE: Metaspace adds "▁" before the first word, byte fallback.

    Merges are derived from the vocabulary, ranked by the merged token's score (higher first).
    Like transformers' LlamaTokenizer, the BPE has no unk token: byte fallback covers any character.
    """
    scores = meta.get("tokenizer.ggml.scores")
    scores = list(scores) if scores is not None else [0.0] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))
    ranked = []
    for token, score in score_of.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -len(left), -len(right), left, right))
    ranked.sort(key=lambda m: m[:3])  # stable: ties keep vocabulary order
    merges = [(m[3], m[4]) for m in ranked]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used to spell byte-level tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _byte_level_bpe(tokens: list[str], meta: Mapping[str, Any]) -> Tokenizer:
    """Byte-level BPE with the file's merges and the split regex its `tokenizer.ggml.pre` names.

    Tokens that use characters outside the byte alphabet (rare, written as plain text by some
    converters) are respelled from their UTF-8 bytes.
    """
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
    vocab = {token: i for i, token in enumerate(spelled)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False, dropout=None)
    )  # fmt: skip
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:  # GPT-2's own regex, built into the ByteLevel pre-tokenizer
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_special_tokens(
    tokenizer: Tokenizer,
    tokens: list[str],
    types: list[int],
    byte_level: bool,
    ids: Mapping[str, int | None],
) -> None:
    """Control tokens (and the named bos/eos/unk/pad) as special tokens, user-defined ones as plain
    added tokens, all matched whole in raw text.

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a converter
    mislabel and is skipped (as transformers does).
    """
    alphabet = set(_byte_alphabet().values()) if byte_level else None
    named = {i for i in ids.values() if i is not None}
    vocab = tokenizer.get_vocab()
    special, plain = [], []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if (kind == CONTROL and (alphabet is None or set(token) <= alphabet)) or i in named:
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == USER_DEFINED and token in vocab:
            plain.append(AddedToken(token, special=False, normalized=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def _bos_eos_template(
    tokens: list[str], ids: Mapping[str, int | None], add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """`encode(add_special_tokens=True)` adds BOS/EOS when the file asks for them."""
    bos, eos = ids["bos_token_id"], ids["eos_token_id"]
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    first = f"{tokens[bos]}:0 " if add_bos else ""
    last = f" {tokens[eos]}:0" if add_eos else ""
    single = f"{first}$A:0{last}"
    pair = single + (f" {tokens[bos]}:1" if add_bos else "") + " $B:1" + (f" {tokens[eos]}:1" if add_eos else "")
    special = ([(tokens[bos], bos)] if add_bos else []) + ([(tokens[eos], eos)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
