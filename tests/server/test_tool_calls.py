"""Tool calling on /v1/chat/completions: the request's tools and tool_choice (validated, rendered by the chat
template, turned into a constraint for `required` and a named function), the `<tool_call>` parser (whole and
streamed), and the whole path with the official `openai` client against `ember serve` on Qwen2.5-Coder 0.5B
Instruct (the live server is shared with test_structured_server.py)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
import xgrammar
from pydantic import ValidationError
from xgrammar.testing import _is_grammar_accept_string as grammar_accepts

from ember.server.body import _field_error
from ember.server.chat_template import ChatTemplates, TemplateLimits
from ember.server.protocol import ChatCompletionRequest
from ember.server.tools import ToolCall, ToolCallParser, parse_tool_calls
from ember.tokenizer import Tokenizer

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}  # fmt: skip
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                            "parameters": CITY}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
                                         "parameters": CITY}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def request(**fields: Any) -> ChatCompletionRequest:
    """The request as the server reads it; a FieldError (what the client gets as a 400) if it is refused."""
    body = json.dumps({"messages": ASK, **fields})
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise _field_error(e) from None


def call(name: str, arguments: dict[str, Any]) -> str:
    """A call as Qwen2.5's chat template writes one."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


# -- requests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"tools": [{"type": "function"}]}, "tools[0].function", "required"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type", ""),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools[0].function.name", "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
     "tools[0].function.parameters", ""),
    ({"tools": [WEATHER, WEATHER]}, "tools", "more than one function is named 'get_weather'"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice", ""),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "no function named 'get_time'"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "cannot be combined with tool_choice required"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f",
                                                                                       "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments", "not valid JSON"),
    ({"functions": [{"name": "f"}]}, "functions", "not supported"),
])  # fmt: skip
def test_malformed_tools_are_refused(fields: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        request(**fields)
    assert getattr(error.value, "param", None) == param and message in str(error.value)


def test_tool_choice_modes() -> None:
    assert request().tool_choice_mode == "none" and request().called_tools is None
    assert request(tool_choice="auto").called_tools is None  # nothing to call: accepted, as a no-op
    auto = request(tools=[WEATHER, TIME])
    assert auto.tool_choice_mode == "auto" and auto.called_tools == ["get_weather", "get_time"]
    assert auto.sampling_params().structured_outputs is None  # auto: the model chooses, the text is parsed
    assert request(tools=[WEATHER], tool_choice="none").called_tools is None  # tools rendered, output not parsed


def _compiled_tool_grammar(fields: dict[str, Any]) -> xgrammar.Grammar:
    constraint = request(**fields).sampling_params().structured_outputs
    assert constraint is not None and constraint.kind == "structural_tag"
    return xgrammar.Grammar.from_structural_tag(constraint.key().source)


def test_required_and_named_constrain_the_output_to_calls() -> None:
    paris, noon = call("get_weather", {"city": "Paris"}), call("get_time", {"city": "Rome"})
    required = _compiled_tool_grammar({"tools": [WEATHER, TIME], "tool_choice": "required"})
    assert grammar_accepts(required, paris) and grammar_accepts(required, paris + "\n" + noon)
    for wrong in ("", "Sure!", call("get_weather", {"town": "Paris"}), call("get_date", {"city": "Paris"})):
        assert not grammar_accepts(required, wrong), wrong
    single = _compiled_tool_grammar({"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False})
    assert grammar_accepts(single, noon) and not grammar_accepts(single, paris + "\n" + noon)
    named = _compiled_tool_grammar({"tools": [WEATHER, TIME],
                                    "tool_choice": {"type": "function", "function": {"name": "get_time"}}})  # fmt: skip
    assert grammar_accepts(named, noon) and not grammar_accepts(named, paris)
    assert not grammar_accepts(named, noon + "\n" + noon)  # a named function: exactly one call, as OpenAI
    no_parameters = _compiled_tool_grammar({"tools": [{"type": "function", "function": {"name": "ping"}}],
                                            "tool_choice": "required"})  # fmt: skip
    assert grammar_accepts(no_parameters, call("ping", {})) and not grammar_accepts(no_parameters, call("ping", []))


def test_the_template_renders_tools_calls_and_results(qwen_path: str) -> None:
    """Qwen2.5's template, as transformers renders it: tools in the system turn, an earlier call's arguments as
    an object (sent as JSON text), the tool's result as a tool_response."""
    body = request(tools=[WEATHER], messages=[
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    ])  # fmt: skip
    tokenizer = Tokenizer.from_pretrained(qwen_path)
    text = ChatTemplates(tokenizer, TemplateLimits(1 << 20, 5)).render(body.conversation(), True, None,
                                                                       body.template_variables())  # fmt: skip
    assert text == tokenizer.apply_chat_template(body.conversation(), tools=body.template_variables()["tools"])
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert "<|im_start|>assistant\n" + call("get_weather", {"city": "Paris"}) + "<|im_end|>" in text
    assert "<tool_response>\n22 C, sunny\n</tool_response>" in text


# -- the parser --------------------------------------------------------------------------------------

TEXTS = [
    call("get_weather", {"city": "Paris"}),
    "Let me look.\n" + call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {"city": "Rome"}) + "\n",
    "No calls here, just text with <b>tags</b> and a < sign.  ",
    "Before " + "<tool_call>\n{not json}\n</tool_call>" + " after",  # malformed: content as written
    "<tool_call>\n" + '{"name": "f"}' + "\n</tool_call>",  # no arguments: not a call
    call("f", {"a": [1, {"b": "</tool"}]}) + " done",
    "cut off: " + "<tool_call>\n{\"name\": \"f\", \"argu",  # never closed (max_tokens)
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',  # untagged, the whole output
    '  {"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    '{"name": "delete_all", "arguments": {}}',  # untagged, not one of the tools: content
    '{"name": "get_weather", "arguments": {"city": "Paris"}} and then some',
    '{"answer": 42}',
]
EXPECTED = [
    (None, [("get_weather", {"city": "Paris"})]),
    ("Let me look.", [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Rome"})]),
    (TEXTS[2], []),
    (TEXTS[3], []),
    (TEXTS[4], []),
    ("done", [("f", {"a": [1, {"b": "</tool"}]})]),
    (TEXTS[6], []),
    (None, [("get_weather", {"city": "Paris"})]),
    (None, [("get_weather", {"city": "Paris"})]),
    (TEXTS[9], []),
    (TEXTS[10], []),
    (TEXTS[11], []),
]
NAMES = ["get_weather", "get_time"]


def _shape(content: str | None, calls: list[ToolCall]) -> tuple[str | None, list[tuple[str, Any]]]:
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == len(calls)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(("text", "expected"), list(zip(TEXTS, EXPECTED)), ids=range(len(TEXTS)))
def test_parse_tool_calls(text: str, expected: tuple[str | None, list[Any]]) -> None:
    assert _shape(*parse_tool_calls(text, NAMES)) == expected


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_streamed_parse_is_the_same(text: str, piece: int) -> None:
    """Fed a few characters at a time: the same content and calls, and no call's text ever as content."""
    parser = ToolCallParser(NAMES)
    events = []
    for start in range(0, len(text), piece):
        events += parser.feed(text[start:start + piece])
    events += parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert _shape(content or None, calls) == _shape(*parse_tool_calls(text, NAMES))
    assert parser.num_calls == len(calls)


def test_streamed_content_is_not_held_back_longer_than_needed() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("Hello") == ["Hello"]
    assert parser.feed(" world <tool") == [" world"]  # " <tool" may start a call
    assert parser.feed("s> are fine") == [" <tools> are fine"]
    assert parser.feed("\n<tool_call>\n" + '{"name": "get_time", "arguments": {"city": "Rome"}}') == []
    assert [e.name for e in parser.feed("\n</tool_call>") if isinstance(e, ToolCall)] == ["get_time"]
    assert parser.finish() == []


# -- live --------------------------------------------------------------------------------------------


def _arguments(tool_call: Any) -> dict[str, Any]:
    arguments = json.loads(tool_call.function.arguments)
    jsonschema.validate(arguments, CITY)
    return arguments


def test_required(qwen_client: openai.OpenAI) -> None:
    response = qwen_client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER, TIME],
                                                   tool_choice="required", max_tokens=40, temperature=0)  # fmt: skip
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls and choice.message.tool_calls[0].function.name in NAMES
    for tool_call in choice.message.tool_calls:
        assert tool_call.type == "function" and tool_call.id.startswith("call_")
        _arguments(tool_call)


def test_named_function_even_when_the_question_is_about_something_else(qwen_client: openai.OpenAI) -> None:
    response = qwen_client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "What time is it in Rome?"}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    [tool_call] = choice.message.tool_calls
    assert tool_call.function.name == "get_weather" and _arguments(tool_call)


def test_auto(qwen_client: openai.OpenAI) -> None:
    """Qwen 0.5B calls get_weather for a weather question (it writes the call's JSON without the tags)."""
    response = qwen_client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], max_tokens=40,
                                                   temperature=0)  # fmt: skip
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [tool_call] = choice.message.tool_calls
    assert tool_call.function.name == "get_weather" and _arguments(tool_call) == {"city": "Paris"}
    plain = qwen_client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], tool_choice="none",
                                                max_tokens=40, temperature=0)  # fmt: skip
    assert plain.choices[0].message.tool_calls == [] and plain.choices[0].finish_reason == "stop"
    assert json.loads(plain.choices[0].message.content)["name"] == "get_weather"  # the same text, not parsed


def test_the_conversation_continues_after_a_call(qwen_client: openai.OpenAI) -> None:
    """The client's own message with the call, and the tool's result, go back in as the conversation (what
    the template makes of them is tested above; what a 0.5B model then says is its business)."""
    first = qwen_client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], tool_choice="required",
                                                max_tokens=40, temperature=0)  # fmt: skip
    message = first.choices[0].message
    result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "22 C and sunny"}
    answer = qwen_client.chat.completions.create(model="qwen", messages=[*ASK, message.model_dump(exclude_none=True),
                                                                         result], tools=[WEATHER], max_tokens=2)
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_streamed_tool_calls(qwen_client: openai.OpenAI, tool_choice: str) -> None:
    """Deltas as OpenAI streams them: the call's index, id, type and name, then arguments; no call text as
    content; the last chunk's finish_reason is tool_calls. They add up to the non-streamed response."""
    fields: dict[str, Any] = {"model": "qwen", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": tool_choice,
                              "max_tokens": 40, "temperature": 0}  # fmt: skip
    whole = qwen_client.chat.completions.create(**fields).choices[0]
    content, calls, finish = "", {}, None
    for chunk in qwen_client.chat.completions.create(**fields, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            if part.index not in calls:
                assert part.id and part.id.startswith("call_") and part.type == "function" and part.function.name
                calls[part.index] = {"name": part.function.name, "arguments": ""}
            calls[part.index]["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" == whole.finish_reason
    assert "<tool_call>" not in content and (content or None) == whole.message.content
    expected = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]
    assert [calls[i] for i in sorted(calls)] == expected


def test_bad_tool_parameters_get_400_and_the_server_keeps_serving(qwen_client: openai.OpenAI) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                       "properties": {"x": {"type": "nope"}}}}}
    with pytest.raises(openai.BadRequestError) as error:
        qwen_client.chat.completions.create(model="qwen", messages=ASK, tools=[bad], tool_choice="required",
                                            max_tokens=5)  # fmt: skip
    assert error.value.body["param"] == "tools" and "nope" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        qwen_client.chat.completions.create(model="qwen", messages=ASK, tools=[{"type": "function"}], max_tokens=5)
    assert error.value.body["param"] == "tools[0].function"
    ok = qwen_client.chat.completions.create(model="qwen", messages=ASK, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"
