"""JSON Schemas rewritten where xgrammar 0.2.9 would let invalid JSON through.

xgrammar turns a string with minLength / maxLength into `"\"" [^"\\\r\n]{min,max} "\""`: raw tabs and
other control characters pass (invalid JSON), and escapes don't. Such a string becomes the equivalent
pattern over plain characters, which xgrammar compiles exactly: no control characters, no quote or
backslash (so no escapes either; the length is then the decoded length).
"""

from __future__ import annotations

import copy
from typing import Any

_PLAIN_CHARACTER = '[^"\\\\\\x00-\\x1f]'


def prepare_json_schema(schema: Any) -> Any:
    """A copy of `schema` with every length-bounded string (without a pattern or format) as a pattern."""
    schema = copy.deepcopy(schema)
    _rewrite(schema)
    return schema


def _rewrite(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _rewrite(item)
        return
    if not isinstance(node, dict):
        return
    bounded = "minLength" in node or "maxLength" in node
    if node.get("type") == "string" and bounded and "pattern" not in node and "format" not in node:
        low, high = node.pop("minLength", 0), node.pop("maxLength", None)
        if isinstance(low, int) and (high is None or isinstance(high, int)):
            node["pattern"] = f"^{_PLAIN_CHARACTER}{{{low},{'' if high is None else high}}}$"
        else:  # not integers: leave them for the compiler to refuse
            node["minLength"], node["maxLength"] = low, high
    for value in node.values():
        _rewrite(value)
