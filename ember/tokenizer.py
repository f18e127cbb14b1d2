"""Text <-> token ids for the engine: encoding, decoding, streaming decoding and chat templates.

The tokenizer behaves like transformers' (our reference): the same ids for the same text, the
same decoded text, and the same chat template rendering. It wraps a `tokenizers.Tokenizer`, built
from a GGUF's vocabulary (`ember.loader.gguf_tokenizer`) or read from a Hugging Face folder.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken

from ember.errors import InvalidRequestError, ModelNotFoundError
from ember.loader.gguf_file import GGUFFile
from ember.loader.gguf_tokenizer import build_gguf_tokenizer

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """A model's tokenizer.

    `eos_token_ids` holds every id that ends generation (the tokenizer's EOS, plus the end-of-turn
    ids generation_config.json or the GGUF name). `all_special_ids` is the set `decode` drops when
    `skip_special_tokens` is set.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.chat_template = chat_template
        # Named special tokens as strings ("bos_token": "<bos>", ...): chat templates can read them.
        self.special_tokens = dict(special_tokens or {})
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._templates: dict[str, jinja2.Template] = {}
        self._byte_level: bool | None = None  # decoder kind, looked up on first token_bytes()

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_pretrained(cls, path: str) -> Tokenizer:
        """Load from a .gguf file or a Hugging Face folder (tokenizer.json + tokenizer_config.json)."""
        if os.path.isdir(path):
            return _from_hf_folder(path)
        if os.path.isfile(path):
            return cls.from_gguf(GGUFFile(path))
        raise ModelNotFoundError(f"tokenizer not found: {path} is neither a .gguf file nor a folder")

    @classmethod
    def from_gguf(cls, source: GGUFFile | Mapping[str, Any]) -> Tokenizer:
        """From an open `GGUFFile` (e.g. the model loader's, so the file is parsed once) or its metadata."""
        backend, info = build_gguf_tokenizer(source)
        names = {
            name: backend.id_to_token(info[f"{name}_id"]) for name in _NAMED_SPECIALS if info[f"{name}_id"] is not None
        }
        return cls(
            backend,
            bos_token_id=info["bos_token_id"],
            eos_token_ids=info["eos_token_ids"],
            pad_token_id=info["pad_token_id"],
            unk_token_id=info["unk_token_id"],
            chat_template=info["chat_template"],
            special_tokens=names,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS (or EOS) where the model wants it."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, not {type(text).__name__}")
        # encode_batch releases the GIL while it works (encode holds it: seconds on a megabyte of text,
        # during which no other Python thread, the engine's step loop included, can run).
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (a byte-fallback or byte-level token may be part of a
        character, which `decode([token_id])` shows as U+FFFD): OpenAI's logprobs `bytes` field."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self.all_special_ids:
            return piece.encode()
        if self._byte_level is None:
            decoder = json.loads(self.backend.to_str()).get("decoder") or {}
            self._byte_level = "ByteLevel" in json.dumps(decoder)
        if self._byte_level:
            table = _unicode_to_byte()
            return bytes(table[c] for c in piece if c in table)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]:
        return [self.backend.token_to_id(t) for t in tokens]

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text with the model's jinja2 chat template, as transformers
        does (same sandbox, options and helpers). Extra `kwargs` (e.g. `tools`) reach the template.

        Encode the result with `add_special_tokens=False`, as transformers does: templates write BOS
        themselves when the model wants one."""
        template = chat_template or self.chat_template
        if template is None:
            raise InvalidRequestError(
                "this model has no chat template (none in its tokenizer files): use a plain prompt instead"
            )
        if not messages:
            raise InvalidRequestError("cannot apply the chat template to an empty conversation")
        # Like transformers: keys set to None are dropped (templates test for presence, not for None).
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        compiled = self._templates.get(template)
        if compiled is None:
            compiled = self._templates[template] = _compile_template(template)
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template error: {e}") from e


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): rendered as is."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    """Jinja's own `tojson` escapes HTML characters; chat templates expect plain JSON."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    """Chat templates are untrusted code from model files: render them in an immutable sandbox."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidRequestError(f"the chat template is not valid jinja2: {e}") from e


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE writes each byte as a printable character: printable ASCII and Latin-1 bytes stand
    for themselves, the other 68 bytes take the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _from_hf_folder(folder: str) -> Tokenizer:
    """A Hugging Face tokenizer folder, read the way transformers (v5) reads it: tokenizer.json's
    post-processor alone decides about BOS/EOS (add_bos_token in the config is ignored), named
    special tokens missing from it become special added tokens, chat_template.jinja wins over the
    config's template."""
    tokenizer_file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise ModelNotFoundError(f"{folder} has no tokenizer.json")
    backend = tokenizers.Tokenizer.from_file(tokenizer_file)
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
    generation = _read_json(os.path.join(folder, "generation_config.json"))

    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    extra = []
    for _, spec in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        if spec.get("content") not in present:
            fields = ("single_word", "lstrip", "rstrip", "normalized", "special")
            extra.append(AddedToken(spec["content"], **{k: spec[k] for k in fields if k in spec}))
            present.add(spec["content"])
    names: dict[str, str] = {}
    for name in _NAMED_SPECIALS:
        text = _token_text(config.get(name, special_map.get(name)))
        if text is not None:
            names[name] = text
            if text not in present:
                extra.append(AddedToken(text, special=True, normalized=False))
                present.add(text)
    if extra:
        backend.add_tokens(extra)

    def id_of(name: str) -> int | None:
        return backend.token_to_id(names[name]) if name in names else None

    bos, eos = id_of("bos_token"), id_of("eos_token")
    eos_ids = [eos] if eos is not None else []
    extra_eos = generation.get("eos_token_id")
    eos_ids += [extra_eos] if isinstance(extra_eos, int) else list(extra_eos or [])

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    elif template is None:
        template = _read_json(os.path.join(folder, "chat_template.json")).get("chat_template")

    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        pad_token_id=id_of("pad_token"),
        unk_token_id=id_of("unk_token"),
        chat_template=template,
        special_tokens=names,
    )


class IncrementalDetokenizer:
    """Streaming decode: feed token ids one at a time, get new text.

    Decodes a small window (a few tokens of left context + the tokens not yet emitted) and emits
    what the new tokens add to the context's text, so work per token is O(window), spaces between
    tokens come out right, and text is held back while the window's tail decodes to U+FFFD (a
    character split across byte tokens). The concatenation of the deltas equals
    `tokenizer.decode(generated ids)` (for decoders that do not strip a leading space, like
    byte-level BPE and Gemma's); call `flush()` at the end to release text still held back.
    """

    _CONTEXT = 5  # prompt tokens of left context, so the first token's leading space survives

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = [int(i) for i in prompt_ids[max(0, len(prompt_ids) - self._CONTEXT) :]]
        if self._decode(context).endswith("\ufffd"):  # a prompt ending mid-character is no stable prefix
            context = []
        self._window = context  # ids from the start of the left context on
        self._read = len(context)  # window[:read] is emitted text; window[read:] is held back
        self._deltas: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def add(self, token_id: int) -> str:
        """Append one generated id; returns the text it completes (may be "")."""
        if self._skip and token_id in self._tokenizer.all_special_ids:
            return ""  # decode drops it anyway; keeping it out keeps the window small
        self._window.append(token_id)
        prefix = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        return self._emit(text[len(prefix) :])

    def fork(self) -> IncrementalDetokenizer:
        """An independent copy at the same point (a forked sequence goes on from the same text)."""
        copy = object.__new__(IncrementalDetokenizer)
        copy._tokenizer, copy._skip = self._tokenizer, self._skip
        copy._window, copy._read, copy._deltas = list(self._window), self._read, list(self._deltas)
        return copy

    def flush(self) -> str:
        """At the end of generation: the held-back text (e.g. bytes that never formed a character)."""
        prefix = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        return self._emit(text[len(prefix) :]) if len(text) > len(prefix) else ""

    def _emit(self, delta: str) -> str:
        # The emitted tokens become the next left context.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._deltas.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._deltas)
