"""StructuredOutputsParams: exactly one constraint, checked types, one cache key per meaning."""

from __future__ import annotations

import pytest

from ember import SamplingParams
from ember.errors import InvalidRequestError
from ember.structured.params import StructuredOutputsParams as Constraint


def test_one_constraint_and_its_key():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    assert Constraint(json=schema).key() == Constraint(json='{"type": "object", "properties": '
                                                          '{"b": {"type": "integer"}, "a": {"type": "string"}}}').key()
    # Property order is meaning: the output's keys come in the schema's order.
    assert Constraint(json=schema).key() != Constraint(json='{"type": "object", "properties": '
                                                          '{"a": {"type": "string"}, "b": {"type": "integer"}}}').key()
    assert Constraint(json=schema).key() != Constraint(json=schema, disable_any_whitespace=True).key()
    assert Constraint(regex="a+").kind == "regex"
    assert Constraint(choice=["x", "y"]).key().source == '["x", "y"]'


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "exactly one"),
        ({"json": {}, "regex": "a"}, "exactly one"),
        ({"json": "[1,"}, "not valid JSON"),
        ({"json": [1, 2]}, "JSON object"),
        ({"regex": ""}, "non-empty string"),
        ({"regex": 3}, "non-empty string"),
        ({"choice": ["a", ""]}, "non-empty strings"),
        ({"choice": "a"}, "list"),
        ({"grammar": ["root"]}, "non-empty string"),
        ({"json_object": "yes"}, "json_object must be true"),
        ({"regex": "a", "disable_any_whitespace": "no"}, "boolean"),
    ],
)
def test_bad_constraints(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        Constraint(**fields)


def test_from_dict_and_sampling_params():
    assert SamplingParams(structured_outputs={"regex": "[0-9]+"}).structured_outputs == Constraint(regex="[0-9]+")
    with pytest.raises(InvalidRequestError, match="unsupported field"):
        Constraint.from_dict({"regex": "a", "whitespace_pattern": " "})
    with pytest.raises(InvalidRequestError, match="must be an object"):
        SamplingParams(structured_outputs="json")
