"""JSON Schemas the structured-output tests generate against: every feature the issue lists (nested objects,
arrays with min/maxItems, enum, const, anyOf/oneOf, pattern, numeric bounds, nullable types,
additionalProperties: false, $defs/$ref), each with a prompt that invites it. Integers are bounded: a model sampled at temperature 1 can write digits past
any max_tokens, and a constraint cannot make it stop."""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "minLength": 1, "maxLength": 12}

SCHEMAS: dict[str, dict[str, Any]] = {
    "string": {"type": "string", "maxLength": 20},
    "integer_bounds": {"type": "integer", "minimum": -5, "maximum": 250},
    "number_bounds": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "enum": {"enum": ["red", "green", "blue", 3, None]},
    "const": {"const": "fixed-value"},
    "flat_object": {
        "type": "object",
        "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999}, "note": {"type": "string", "maxLength": 10}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": _NAME,
                    "address": {
                        "type": "object",
                        "properties": {"city": _NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "tuple_prefix_items": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 5}, {"type": "integer", "minimum": -999, "maximum": 999}, {"type": "boolean"}],
        "items": False,
        "minItems": 3,
    },
    "enum_in_object": {
        "type": "object",
        "properties": {"status": {"enum": ["open", "closed", "pending"]}, "priority": {"enum": [1, 2, 3]}},
        "required": ["status", "priority"],
        "additionalProperties": False,
    },
    "const_in_object": {
        "type": "object",
        "properties": {"version": {"const": 2}, "kind": {"const": "event"}, "payload": {"type": "string", "maxLength": 8}},
        "required": ["version", "kind", "payload"],
        "additionalProperties": False,
    },
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 6}]},
    "one_of_objects": {
        "oneOf": [
            {"type": "object", "properties": {"circle": {"type": "number", "minimum": 0}}, "required": ["circle"], "additionalProperties": False},
            {"type": "object", "properties": {"square": {"type": "integer", "minimum": 0, "maximum": 1000}}, "required": ["square"], "additionalProperties": False},
        ]
    },
    "pattern_phone": {"type": "string", "pattern": "^\\+?[0-9]{2,3}-[0-9]{3}-[0-9]{4}$"},
    "pattern_date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"},
    "format_like_email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org|net)$"},
    "nullable_type_list": {
        "type": "object",
        "properties": {"middle_name": {"type": ["string", "null"], "maxLength": 10}, "age": {"type": ["integer", "null"], "minimum": 0, "maximum": 130}},
        "required": ["middle_name", "age"],
        "additionalProperties": False,
    },
    "nullable_any_of": {
        "type": "object",
        "properties": {"score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 10}, {"type": "null"}]}},
        "required": ["score"],
        "additionalProperties": False,
    },
    "defs_ref": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -999, "maximum": 999}, "y": {"type": "integer", "minimum": -999, "maximum": 999}}, "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    # Nested $refs three levels deep. A self-referencing node is a branching process that a model sampled at
    # temperature 1 may not end within max_tokens (the Qwen run once nested past 256 tokens), and no constraint
    # can make it stop; RECURSIVE below is checked on the grammar matcher instead.
    "nested_refs": {
        "$defs": {
            "leaf": {"type": "object", "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["value"], "additionalProperties": False},
            "branch": {
                "type": "object",
                "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9}, "children": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 2}},
                "required": ["value"],
                "additionalProperties": False,
            },
        },
        "type": "object",
        "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9}, "children": {"type": "array", "items": {"$ref": "#/$defs/branch"}, "maxItems": 2}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "integer_multiple": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99}}, "required": ["n"], "additionalProperties": False},
    "string_lengths": {"type": "object", "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 3}}, "required": ["code"], "additionalProperties": False},
    "boolean_flags": {
        "type": "object",
        "properties": {"active": {"type": "boolean"}, "admin": {"type": "boolean"}, "verified": {"type": "boolean"}},
        "required": ["active", "admin", "verified"],
        "additionalProperties": False,
    },
    "array_of_enums_unique_size": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "map_with_additional_properties": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}, "maxProperties": 3},
    "all_required_mixed": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 15},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
            "rating": {"type": "number", "minimum": 0, "maximum": 5},
            "genres": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
            "sequel": {"type": ["boolean", "null"]},
        },
        "required": ["title", "year", "rating", "genres", "sequel"],
        "additionalProperties": False,
    },
    "deep_nesting": {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "maxItems": 2}}, "required": ["c"], "additionalProperties": False}}, "required": ["b"], "additionalProperties": False}},
        "required": ["a"],
        "additionalProperties": False,
    },
    "tool_arguments": {
        "type": "object",
        "properties": {"location": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"],
        "additionalProperties": False,
    },
}

assert len(SCHEMAS) >= 30, len(SCHEMAS)

# A node whose children are nodes: unbounded depth, so the grammar itself must recurse.
RECURSIVE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
            "required": ["value"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}
