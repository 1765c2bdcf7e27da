"""JSON schemas for end-to-end structured-output tests on the tiny random-weight model.

The model's free output is gibberish that never closes a string by itself, so every string here has a bounded
length (maxLength, a pattern or an enum), every number a bounded number of digits (integer bounds, multipleOf)
and every array a bounded size: each generation then ends, and JSON that parses and validates proves the
constraint. (An unbounded string runs into the token budget: finish_reason "length", text cut short.)
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

SCHEMAS: dict[str, dict[str, Any]] = {
    "required_fields": {
        "type": "object",
        "properties": {
            "vendor": {"type": "string", "maxLength": 12},
            "total": {"type": "integer", "minimum": 0, "maximum": 99999},
            "paid": {"type": "boolean"},
            "note": {"type": "string", "maxLength": 8},
        },
        "required": ["vendor", "total", "paid"],
        "additionalProperties": False,
    },
    "nested_objects": {
        "type": "object",
        "properties": {
            "customer": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 10},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 10},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["customer"],
        "additionalProperties": False,
    },
    "array_min_max_items": {
        "type": "object",
        "properties": {
            "lines": {
                "type": "array",
                "minItems": 2,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "item": {"type": "string", "maxLength": 6},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["item", "qty"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["lines"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "currency": {"enum": ["EUR", "USD", "JPY"]},
            "status": {"enum": ["paid", "due", None, 3, True]},
            "kind": {"type": "string", "enum": ["invoice", "receipt"]},
        },
        "required": ["currency", "status", "kind"],
        "additionalProperties": False,
    },
    "numbers_with_bounds": {
        "type": "object",
        "properties": {
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01},
            "amount": {"type": "number", "exclusiveMinimum": 10, "maximum": 99.5, "multipleOf": 0.5},
        },
        "required": ["year", "count", "ratio", "amount"],
        "additionalProperties": False,
    },
    "string_patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[01][0-9]-[0-3][0-9]$"},
            "short": {"type": "string", "minLength": 2, "maxLength": 5},
        },
        "required": ["code", "date", "short"],
        "additionalProperties": False,
    },
}

# A top-level integer: complete after any digit yet able to grow, so EOS is allowed before the grammar finishes.
OPEN_ENDED_INTEGER: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": 99999}

# Free text of the random model with an unbounded string: the budget ends it.
UNBOUNDED: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
    "additionalProperties": False,
}


# Schemas of the grammar compiler and request-spec tests (test_structured.py, test_structured_spec.py).
COMPILER_SCHEMAS: dict[str, dict[str, Any]] = {
    "required_fields": {
        "type": "object",
        "properties": {
            "vendor": {"type": "string"},
            "total": {"type": "number"},
            "paid": {"type": "boolean"},
            "note": {"type": "string"},
        },
        "required": ["vendor", "total", "paid"],
        "additionalProperties": False,
    },
    "nested_objects": {
        "type": "object",
        "properties": {
            "customer": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["customer"],
        "additionalProperties": False,
    },
    "array_min_max_items": {
        "type": "object",
        "properties": {
            "lines": {
                "type": "array",
                "minItems": 2,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {"item": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                    "required": ["item", "qty"],
                    "additionalProperties": False,
                },
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
        },
        "required": ["lines", "tags"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "currency": {"enum": ["EUR", "USD", "JPY"]},
            "status": {"enum": ["paid", "due", None, 3, True]},
            "kind": {"type": "string", "enum": ["invoice", "receipt"]},
        },
        "required": ["currency", "status", "kind"],
        "additionalProperties": False,
    },
    "numbers_with_bounds": {
        "type": "object",
        "properties": {
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "amount": {"type": "number", "minimum": 10.5, "maximum": 99.25},
        },
        "required": ["year", "count", "ratio", "amount"],
        "additionalProperties": False,
    },
    "string_patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[01][0-9]-[0-3][0-9]$"},
            "short": {"type": "string", "minLength": 2, "maxLength": 5},
        },
        "required": ["code", "date", "short"],
        "additionalProperties": False,
    },
    "top_level_array_with_refs": {
        "type": "array",
        "minItems": 1,
        "maxItems": 3,
        "items": {"$ref": "#/$defs/point"},
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
    },
}


def validated(text: str, schema: dict[str, Any]) -> Any:
    """The parsed JSON text, after checking it against the schema (raises otherwise)."""
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def is_valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        validated(text, schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
