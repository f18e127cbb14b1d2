"""What a request's output must match: a JSON Schema, any JSON object, a regex, one of some strings, an
EBNF grammar or an xgrammar structural tag. vLLM's `StructuredOutputsParams` names; exactly one is set."""

from __future__ import annotations

import json as json_module
from dataclasses import dataclass
from typing import Any

from ember.errors import InvalidRequestError

_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class GrammarKey:
    """What the compiler is asked for: the kind, its canonical source text, and whitespace freedom.
    Requests with equal keys share one compiled grammar."""

    kind: str
    source: str
    any_whitespace: bool = True


@dataclass
class StructuredOutputsParams:
    json: str | dict[str, Any] | None = None
    """A JSON Schema (a dict or its JSON text) the output must validate against."""
    json_object: bool | None = None
    """Any JSON object."""
    regex: str | None = None
    """A regular expression the whole output must match."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar (xgrammar's dialect: GBNF-like, `root ::= ...`)."""
    structural_tag: str | dict[str, Any] | None = None
    """An xgrammar structural tag (a dict or its JSON text): tagged regions with constrained content."""
    disable_any_whitespace: bool = False
    """JSON only: no free whitespace between tokens (compact output)."""

    def __post_init__(self) -> None:
        set_kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            found = ", ".join(set_kinds) or "none"
            raise InvalidRequestError(f"structured outputs need exactly one of {', '.join(_KINDS)} (got {found})")
        if not isinstance(self.disable_any_whitespace, bool):
            raise InvalidRequestError("structured outputs: disable_any_whitespace must be a boolean")
        self.key()  # type and JSON checks, before a request is queued

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> GrammarKey:
        kind, value = self.kind, getattr(self, self.kind)
        any_whitespace = not self.disable_any_whitespace
        if kind in ("json", "structural_tag"):
            return GrammarKey(kind, _canonical_json(kind, value), any_whitespace)
        if kind == "json_object":
            if value is not True:
                raise InvalidRequestError("structured outputs: json_object must be true")
            return GrammarKey(kind, "", any_whitespace)
        if kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise InvalidRequestError("structured outputs: choice must be a non-empty list of non-empty strings")
            return GrammarKey(kind, json_module.dumps(value, ensure_ascii=False))
        if not isinstance(value, str) or not value:
            raise InvalidRequestError(f"structured outputs: {kind} must be a non-empty string")
        return GrammarKey(kind, value)

    @classmethod
    def from_dict(cls, value: StructuredOutputsParams | dict[str, Any]) -> StructuredOutputsParams:
        """From vLLM's request body field (a dict with these names); unknown names are refused."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidRequestError("structured outputs must be an object")
        unknown = sorted(set(value) - set(_KINDS) - {"disable_any_whitespace"})
        if unknown:
            raise InvalidRequestError(f"structured outputs: unsupported field(s) {', '.join(unknown)}")
        return cls(**value)


def _canonical_json(kind: str, value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json_module.loads(value)
        except ValueError as e:
            raise InvalidRequestError(f"structured outputs: {kind} is not valid JSON: {e}") from None
    if not isinstance(value, dict) and not (kind == "json" and isinstance(value, bool)):
        raise InvalidRequestError(f"structured outputs: {kind} must be a JSON object")
    try:  # keys keep their order: the grammar emits properties in the schema's order, as OpenAI documents
        return json_module.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"structured outputs: {kind} cannot be serialized as JSON: {e}") from None
