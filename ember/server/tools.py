"""Tool calls in the Hermes / Qwen2.5 text format, which Qwen2.5's chat template tells the model to write:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`tool_call_constraint` makes the output exactly such calls (for tool_choice `required` or a named
function); `ToolCallParser` reads them out of generated text, streamed or whole, leaving the rest as content.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from ember.structured.params import StructuredOutputsParams

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# How Qwen2.5's template writes a call (and so how the model writes one); parallel calls are joined by "\n".
_CALL_BEGIN = OPEN + '\n{{"name": {name}, "arguments": '
_CALL_END = "}\n" + CLOSE
_SEPARATOR = "\n"
_BARE_START = '{"name"'  # how an untagged call starts, whitespace removed
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_call_constraint(
    functions: Sequence[tuple[str, dict[str, Any] | None]], single: bool
) -> StructuredOutputsParams:
    """Output that is one call (`single`) or several, each to one of `functions` ((name, parameters
    schema)) with arguments valid for its schema; nothing else. An xgrammar structural tag: the fixed text
    of a call around the JSON schema of its arguments."""
    tags = [
        {"type": "tag", "begin": _CALL_BEGIN.format(name=json.dumps(name, ensure_ascii=False)),
         "content": {"type": "json_schema", "json_schema": parameters or _ANY_OBJECT}, "end": _CALL_END}
        for name, parameters in functions
    ]  # fmt: skip
    calls = {"type": "tags_with_separator", "tags": tags, "separator": _SEPARATOR, "at_least_one": True,
             "stop_after_first": single}  # fmt: skip
    return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": calls})


def _parse_call(body: str) -> ToolCall | None:
    """The call written between the tags, or None when it is not one (the text then stays content)."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    if not isinstance(call.get("arguments"), dict):
        return None
    return ToolCall(call["name"], json.dumps(call["arguments"], ensure_ascii=False))


def _partial_open(text: str) -> int:
    """The length of the longest end of `text` that could be the start of OPEN."""
    return next((k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if text.endswith(OPEN[:k])), 0)


class ToolCallParser:
    """Splits generated text into content and tool calls as it arrives. `feed` returns what is certain
    so far; text that may still turn out to be (part of) a call is held back: from `<tool_call>` until
    `</tool_call>`, a possible start of the tag, and trailing whitespace. Whitespace next to a call is
    dropped (text without calls is content exactly as written), so content is the same whether the text
    came whole or piece by piece. A block whose inside is not a call (bad JSON, no name or arguments), or
    one never closed, is content as written.

    Small models often write the call's JSON without the tags (Qwen2.5-Coder 0.5B nearly always does). As
    llama.cpp's Hermes parser, an output that is nothing but one `{"name": ..., "arguments": {...}}` naming
    one of `tool_names` is a call too; text that starts like one is held back until the end to tell."""

    def __init__(self, tool_names: Collection[str] = ()) -> None:
        self._tool_names = tool_names
        self._buffer = ""  # text not yet returned
        self._inside = False  # the buffer follows an OPEN
        self._space = ""  # whitespace before the OPEN: content unless the block is a call
        self._after_call = False  # right after a call: leading whitespace is dropped
        self._bare: bool | None = None if tool_names else False  # the output may be one untagged call
        self.num_calls = 0

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buffer += text
        if self._bare is None:
            start = "".join(self._buffer.split())[: len(_BARE_START)]  # whitespace apart, as JSON allows
            if not _BARE_START.startswith(start):
                self._bare = False
            elif len(start) == len(_BARE_START):
                self._bare = True
        return [] if self._bare is not False else self._scan()

    def finish(self) -> list[str | ToolCall]:
        """What is left once generation ended: an unclosed block and held-back text, as content."""
        if self._bare is not False:
            self._bare = False
            call = _parse_call(self._buffer)
            if call is not None and call.name in self._tool_names:
                self._buffer = ""
                self.num_calls += 1
                return [call]
        out = self._scan()
        rest = self._space + OPEN + self._buffer if self._inside else self._buffer
        self._buffer, self._inside, self._space = "", False, ""
        return out + self._content(rest)

    def _scan(self) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        while True:
            if self._inside:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return out
                body, self._buffer, self._inside = self._buffer[:end], self._buffer[end + len(CLOSE):], False
                out += self._call(body)
                continue
            start = self._buffer.find(OPEN)
            if start < 0:
                held = self._buffer[: len(self._buffer) - _partial_open(self._buffer)]
                cut = len(held.rstrip())
                out += self._content(self._buffer[:cut])
                self._buffer = self._buffer[cut:]
                return out
            before = self._buffer[:start]
            text_before = before.rstrip()
            out += self._content(text_before)
            self._space, self._buffer, self._inside = before[len(text_before):], self._buffer[start + len(OPEN):], True

    def _call(self, body: str) -> list[str | ToolCall]:
        call = _parse_call(body)
        if call is None:
            return self._content(self._space + OPEN + body + CLOSE)
        self._space, self._after_call = "", True
        self.num_calls += 1
        return [call]

    def _content(self, text: str) -> list[str | ToolCall]:
        if self._after_call:
            text = text.lstrip()
        if not text:
            return []
        self._after_call = False
        return [text]


def parse_tool_calls(text: str, tool_names: Collection[str] = ()) -> tuple[str | None, list[ToolCall]]:
    """The content (None when there is none) and the calls of a whole generated text."""
    parser = ToolCallParser(tool_names)
    events = parser.feed(text) + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content or None, [e for e in events if isinstance(e, ToolCall)]
