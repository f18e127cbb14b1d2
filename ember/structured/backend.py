"""xgrammar as the structured-output backend: the model's vocabulary as raw bytes, grammars compiled on a
thread pool and cached by key, and the errors of a bad schema, regex or grammar as InvalidRequestError.

xgrammar is an optional dependency (`pip install 'ember[structured]'`); it is imported on the first
constrained request, so an engine that never sees one never loads it.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ember.errors import InvalidRequestError
from ember.structured.params import GrammarKey, StructuredOutputsParams
from ember.structured.schema import prepare_json_schema
from ember.tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar

_CACHED_GRAMMARS = 512  # compiled grammars kept (a JSON schema's is tens of KB to a few MB)
_COMPILE_THREADS = 2
# Free JSON whitespace, but at most this many characters per gap (llama.cpp's JSON grammars bound it too):
# a sampled model can otherwise emit whitespace until max_tokens.
_MAX_WHITESPACE = 20
_INSTALL_HINT = "structured outputs need xgrammar: pip install 'ember[structured]'"
# xgrammar prefixes its errors with a timestamp and the C++ source line; the reason follows.
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise InvalidRequestError(f"{_INSTALL_HINT} ({e})") from None
    return xgrammar


class StructuredOutputBackend:
    """One per engine. `submit` starts (or finds) a compile; `compiled` returns a finished one."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's embedding rows: the bitmask's width
        self._stop_token_ids = stop_token_ids
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._setup_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[GrammarKey, concurrent.futures.Future[xgrammar.CompiledGrammar]] = OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="ember-grammar")

    def submit(self, params: StructuredOutputsParams) -> concurrent.futures.Future[xgrammar.CompiledGrammar]:
        """The compile of this constraint, started now on the pool unless it is cached or under way."""
        key = params.key()
        with self._cache_lock:
            future = self._cache.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, key)
            self._cache[key] = future
            while len(self._cache) > _CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return future

    def compile(self, params: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """Blocking `submit`; a bad constraint raises InvalidRequestError with the compiler's reason."""
        return self.submit(params).result()

    def matcher(self, params: StructuredOutputsParams) -> xgrammar.GrammarMatcher:
        xgr = import_xgrammar()
        return xgr.GrammarMatcher(self.compile(params))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, key: GrammarKey) -> xgrammar.CompiledGrammar:
        compiler = self._get_compiler()
        whitespace: dict[str, Any] = {"any_whitespace": key.any_whitespace, "max_whitespace_cnt": _MAX_WHITESPACE}
        try:
            if key.kind == "json":
                schema = json.dumps(prepare_json_schema(json.loads(key.source)))
                return compiler.compile_json_schema(schema, **whitespace)
            if key.kind == "json_object":  # an object (xgrammar's built-in JSON grammar allows any value)
                return compiler.compile_json_schema('{"type": "object"}', **whitespace)
            if key.kind == "regex":
                return compiler.compile_regex(key.source)
            if key.kind == "choice":
                return compiler.compile_grammar(choice_ebnf(key.source))
            if key.kind == "grammar":
                return compiler.compile_grammar(key.source)
            return compiler.compile_structural_tag(key.source)
        except (RuntimeError, ValueError, TypeError) as e:
            reason = _LOCATION.sub("", str(e).strip()).strip()
            raise InvalidRequestError(f"structured outputs: invalid {key.kind.replace('_', ' ')}: {reason}") from None

    def _get_compiler(self) -> xgrammar.GrammarCompiler:
        with self._setup_lock:  # the vocabulary is built once, by the first compile
            if self._compiler is None:
                xgr = import_xgrammar()
                info = xgr.TokenizerInfo(
                    raw_vocabulary(self._tokenizer),
                    xgr.VocabType.RAW,
                    vocab_size=self.vocab_size,
                    stop_token_ids=self._stop_token_ids,
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=_COMPILE_THREADS)
            return self._compiler


def raw_vocabulary(tokenizer: Tokenizer) -> list[bytes]:
    """Each token id's bytes, as the model reads them; special tokens (and ids the tokenizer does not
    have) are empty, which xgrammar treats as never allowed except as stop tokens."""
    special = tokenizer.all_special_ids
    return [b"" if i in special else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]


def choice_ebnf(choices_json: str) -> str:
    """root ::= "a" | "b" ...; JSON string escapes are valid EBNF string escapes in xgrammar."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(choices_json))
