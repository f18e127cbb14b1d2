"""Structured output on the OpenAI server: each request field that constrains the output (OpenAI's
response_format, vLLM's structured_outputs and its older guided_* fields) maps to the same
StructuredOutputsParams, conflicts and bad constraints are 400s, and with the official `openai` client
against `ember serve` on Qwen2.5-Coder 0.5B Instruct the outputs parse and validate (shared live server)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from pydantic import ValidationError

from ember.server.body import _field_error
from ember.server.protocol import ChatCompletionRequest, CompletionRequest
from ember.structured.params import StructuredOutputsParams as Constraint
from live_server import LiveServer

CAT = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                   "color": {"enum": ["black", "white", "ginger"]}},
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}  # fmt: skip
DESCRIBE = [{"role": "user", "content": "Describe a cat as a JSON object with its name, age and color."}]
ARITHMETIC = 'root ::= term (("+" | "-") term){0,2}\nterm ::= [0-9]{1,3}'  # at most 11 characters


def completion(**fields: Any) -> CompletionRequest:
    return _read(CompletionRequest, {"prompt": "x", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return _read(ChatCompletionRequest, {"messages": DESCRIBE, **fields})


def _read(model: Any, body: dict[str, Any]) -> Any:
    """The request as the server reads it; a FieldError (the client's 400) if it is refused."""
    try:
        return model.model_validate_json(json.dumps(body))
    except ValidationError as e:
        raise _field_error(e) from None


def _json_schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": True}}


TAGGED = {"begin": "<cat>", "schema": CAT, "end": "</cat>"}
MAPPINGS = [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, Constraint(json_object=True)),
    ({"response_format": _json_schema_format(CAT)}, Constraint(json=CAT)),
    ({"structured_outputs": {"json": CAT, "disable_any_whitespace": True}},
     Constraint(json=CAT, disable_any_whitespace=True)),
    ({"structured_outputs": {"regex": "[a-z]+"}}, Constraint(regex="[a-z]+")),
    ({"structured_outputs": {"grammar": ARITHMETIC}}, Constraint(grammar=ARITHMETIC)),
    ({"guided_json": CAT}, Constraint(json=CAT)),
    ({"guided_json": json.dumps(CAT)}, Constraint(json=CAT)),
    ({"guided_regex": r"\d+"}, Constraint(regex=r"\d+")),
    ({"guided_choice": ["yes", "no"]}, Constraint(choice=["yes", "no"])),
    ({"guided_grammar": ARITHMETIC}, Constraint(grammar=ARITHMETIC)),
    ({"response_format": {"type": "structural_tag", "structures": [TAGGED], "triggers": ["<cat>"]}},
     Constraint(structural_tag={"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<cat>"], "tags": [
         {"type": "tag", "begin": "<cat>", "content": {"type": "json_schema", "json_schema": CAT}, "end": "</cat>"}]}})),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "expected"), MAPPINGS, ids=[next(iter(f)) + str(i) for i, (f, _) in
                                                                 enumerate(MAPPINGS)])  # fmt: skip
def test_each_field_maps_to_its_constraint(fields: dict[str, Any], expected: Constraint | None) -> None:
    for body in (completion(**fields), chat(**fields)):
        constraint = body.sampling_params().structured_outputs
        assert (constraint.key() if constraint else None) == (expected.key() if expected else None)


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     "at most one constraint on the output (got response_format and guided_regex)"),
    ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a", "backend": "outlines"}}, "structured_outputs", "unsupported"),
    ({"response_format": {"type": "xml"}}, "response_format", "type must be one of text, json_object, json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "cat"}}}, "response_format.json_schema.schema",
     "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "cat", "schema": "{}"}}},
     "response_format.json_schema.schema", ""),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"response_format": {"type": "structural_tag"}}, "response_format", "needs `format`"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_regex": ""}, "guided_regex", "non-empty"),
    ({"guided_whitespace_pattern": r"[ ]?"}, "guided_whitespace_pattern", "not supported"),
])  # fmt: skip
def test_conflicting_and_malformed_constraints_are_refused(fields: dict[str, Any], param: str, message: str) -> None:
    for read in (completion, chat):
        with pytest.raises(ValueError) as error:
            read(**fields)
        assert getattr(error.value, "param", None) == param and message in str(error.value), str(error.value)


# -- live --------------------------------------------------------------------------------------------


def test_json_object(qwen_client: openai.OpenAI) -> None:
    response = qwen_client.chat.completions.create(model="qwen", messages=DESCRIBE, max_tokens=60, temperature=0,
                                                   response_format={"type": "json_object"})  # fmt: skip
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_json_schema_chat_and_completions(qwen_client: openai.OpenAI) -> None:
    chat_output = qwen_client.chat.completions.create(model="qwen", messages=DESCRIBE, max_tokens=60, temperature=0,
                                                      response_format=_json_schema_format(CAT))  # fmt: skip
    jsonschema.validate(json.loads(chat_output.choices[0].message.content), CAT)
    # A prompt a base model would never answer with this JSON: the constraint alone makes it valid.
    text = qwen_client.completions.create(model="qwen", prompt="def main():", max_tokens=60, temperature=0, seed=1,
                                          extra_body={"response_format": _json_schema_format(CAT)})  # fmt: skip
    jsonschema.validate(json.loads(text.choices[0].text), CAT)


class Cat(pydantic.BaseModel):
    name: str
    age: int
    color: str


def test_parse_with_a_pydantic_model(qwen_client: openai.OpenAI) -> None:
    parsed = qwen_client.chat.completions.parse(model="qwen", messages=DESCRIBE, max_tokens=60, temperature=0,
                                                response_format=Cat).choices[0].message.parsed  # fmt: skip
    assert isinstance(parsed, Cat) and parsed.name


def test_streamed_constrained_output(qwen_client: openai.OpenAI) -> None:
    stream = qwen_client.chat.completions.create(model="qwen", messages=DESCRIBE, max_tokens=60, temperature=0,
                                                 stream=True, response_format=_json_schema_format(CAT))  # fmt: skip
    chunks = [chunk.choices[0] for chunk in stream]
    jsonschema.validate(json.loads("".join(c.delta.content or "" for c in chunks)), CAT)
    assert chunks[-1].finish_reason == "stop"


def test_regex_choice_and_grammar_on_completions(qwen_client: openai.OpenAI) -> None:
    def complete(prompt: str, **constraint: Any) -> str:
        return qwen_client.completions.create(model="qwen", prompt=prompt, max_tokens=16, temperature=0,
                                              extra_body=constraint).choices[0].text  # fmt: skip

    assert re.fullmatch(r"\d{3}-\d{4}", complete("My phone number is", guided_regex=r"\d{3}-\d{4}"))
    assert complete("Is the sky green? Answer:", guided_choice=["yes", "no"]) in ("yes", "no")
    expression = complete("2 + 2 =", structured_outputs={"grammar": ARITHMETIC})
    assert re.fullmatch(r"[0-9]{1,3}([+-][0-9]{1,3}){0,2}", expression), expression


@pytest.mark.parametrize(("path", "body", "param", "message"), [
    ("/v1/chat/completions", {"messages": DESCRIBE, "response_format": _json_schema_format({"type": "nope"})},
     "response_format", "nope"),
    ("/v1/chat/completions", {"messages": DESCRIBE, "response_format": {"type": "yaml"}}, "response_format",
     "type must be one of"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "(unclosed"}, "guided_regex", "parenthesis"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"grammar": "root ::= undefined_rule"}},
     "structured_outputs", "undefined_rule"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}},
     "guided_json", ""),
])  # fmt: skip
def test_bad_constraints_get_400_and_the_server_keeps_serving(
    qwen_server: LiveServer, qwen_client: openai.OpenAI, path: str, body: dict[str, Any], param: str, message: str
) -> None:
    response = httpx.post(qwen_server.url + path, json={"model": "qwen", "max_tokens": 4, **body},
                          headers=qwen_server.headers, timeout=60)  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"
    after = qwen_client.completions.create(model="qwen", prompt="ok", max_tokens=2, temperature=0,
                                           extra_body={"guided_choice": ["fine"]})  # fmt: skip
    assert after.choices[0].text == "fine"
