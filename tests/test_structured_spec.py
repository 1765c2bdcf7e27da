"""Structured output requests: OpenAI `response_format` / Responses `text.format` to one validated JsonSpec.

Bad requests and schemas the engine cannot enforce are `InputError`s naming the field and the problem, raised
before any model work (the server answers 400).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import msgspec
import pytest

from common.engine.structured import (
    MAX_SCHEMA_CHARS,
    ResponseFormat,
    ResponseFormatJsonSchema,
    TextFormatJsonSchema,
    TextParam,
    json_object_spec,
    json_schema_spec,
    spec_from_response_format,
    spec_from_text_format,
    spec_from_text_param,
)
from common.errors import InputError
from tests.structured_cases import COMPILER_SCHEMAS as SCHEMAS


def test_chat_response_format_json_schema() -> None:
    schema = SCHEMAS["enums"]
    spec = spec_from_response_format(
        {"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema, "strict": True}}
    )
    assert spec is not None
    assert (spec.kind, spec.name, spec.strict, spec.schema) == ("json_schema", "invoice", True, schema)
    loose = spec_from_response_format({"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema}})
    assert loose is not None and not loose.strict  # OpenAI's default; the schema is enforced all the same
    assert loose == json_schema_spec(schema, name="invoice", strict=False)


def test_responses_text_format_json_schema() -> None:
    schema = SCHEMAS["nested_objects"]
    spec = spec_from_text_format({"type": "json_schema", "name": "customer", "schema": schema, "strict": False})
    assert spec == json_schema_spec(schema, name="customer", strict=False)
    assert spec_from_text_format({"type": "json_object"}) == json_object_spec()


def test_text_and_absent_formats_are_unconstrained() -> None:
    assert spec_from_response_format(None) is None
    assert spec_from_response_format({"type": "text"}) is None
    assert spec_from_text_format(None) is None
    assert spec_from_text_format({"type": "text"}) is None
    assert spec_from_response_format({"type": "json_object"}) == json_object_spec()


def test_schema_from_json_text() -> None:
    text = json.dumps(SCHEMAS["string_patterns"])
    assert json_schema_spec(text) == json_schema_spec(SCHEMAS["string_patterns"])
    with pytest.raises(InputError, match="schema: not valid JSON"):
        json_schema_spec("{not json")


INVALID_SCHEMAS = [
    ({"type": "strange"}, "Invalid type"),
    ({"type": "string", "pattern": "(unclosed"}, "unclosed group"),
    ({"type": "array", "minItems": 5, "maxItems": 2}, "minItems"),
    ({"type": "integer", "minimum": 10, "maximum": 2}, "minimum"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"not": {"type": "string"}}, "not"),  # a keyword the engine cannot enforce: refused, not ignored
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"enum": []}, "anyOf is empty"),
    ({"type": "array", "items": {"type": "string"}, "minItems": -1}, "minItems"),
    # The engine panics while cutting this error message inside a multi-byte character: still a clean 400.
    ({"type": "integer", "exclusiveMinimum": {"a" * 61 + "é" * 40: 1}}, "the grammar engine failed"),
]


@pytest.mark.parametrize(("schema", "problem"), INVALID_SCHEMAS, ids=[p for _, p in INVALID_SCHEMAS])
def test_invalid_schema_names_the_problem(schema: dict[str, Any], problem: str) -> None:
    request = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(InputError) as info:
        spec_from_response_format(request)
    message = str(info.value)
    assert message.startswith("response_format.json_schema.schema: invalid JSON schema:")
    assert problem in message and "\n" not in message
    assert info.value.param == "response_format.json_schema.schema"
    with pytest.raises(InputError, match=r"^text\.format\.schema: invalid JSON schema"):
        spec_from_text_format({"type": "json_schema", "name": "x", "schema": schema})


def test_guidance_options_in_the_schema_cannot_loosen_it() -> None:
    schema = {"not": {"type": "string"}, "x-guidance": {"lenient": True}}
    with pytest.raises(InputError, match="not"):
        json_schema_spec(schema)


BAD_REQUESTS = [
    ("nope", "response_format: must be an object", "response_format"),
    ({"type": "xml"}, "response_format.type: must be 'text', 'json_object' or 'json_schema', got 'xml'",
     "response_format.type"),
    ({}, "response_format.type: must be", "response_format.type"),
    ({"type": 3}, "response_format.type: must be", "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema: must be an object with 'name' and 'schema'; it is missing",
     "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": "x"}, "response_format.json_schema: must be an object",
     "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema: missing",
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name: must be",
     "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "json_schema.name: must be",
     "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x" * 65, "schema": {}}}, "json_schema.name: must be",
     "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict: must be true or false, got 'yes'", "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": True}}, "schema: must be a JSON object",
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "schema: must be a JSON object",
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": None}}, "schema: must be a JSON object",
     "response_format.json_schema.schema"),
]


@pytest.mark.parametrize(("request_value", "message", "param"), BAD_REQUESTS, ids=[m for _, m, _ in BAD_REQUESTS])
def test_bad_response_format_is_refused(request_value: Any, message: str, param: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)) as info:
        spec_from_response_format(request_value)
    assert str(info.value).startswith(f"{param}: ") and info.value.param == param and "\n" not in str(info.value)


def test_bad_text_format_is_refused() -> None:
    with pytest.raises(InputError, match=r"text\.format\.schema: missing"):
        spec_from_text_format({"type": "json_schema", "name": "x"})
    with pytest.raises(InputError, match=r"text\.format\.name: must be"):
        spec_from_text_format({"type": "json_schema", "schema": {}})
    with pytest.raises(InputError, match=r"text\.format: must be an object"):
        spec_from_text_format(["json_object"])


def test_oversized_schema_is_refused_before_compiling() -> None:
    schema = {"type": "object", "description": "x" * MAX_SCHEMA_CHARS}
    with pytest.raises(InputError, match="the limit is"):
        json_schema_spec(schema)


def test_key_order_is_part_of_the_schema_identity() -> None:
    a = json_schema_spec({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}})
    b = json_schema_spec({"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}})
    assert a != b and a == json_schema_spec(json.loads(a.schema_text))


def test_bad_text_param_is_refused() -> None:
    with pytest.raises(InputError, match=r'^text: must be an object such as \{"format"') as info:
        spec_from_text_param("json")
    assert info.value.param == "text"
    with pytest.raises(InputError, match=r"^text\.format\.type: must be 'text', 'json_object' or 'json_schema', got"):
        spec_from_text_param({"format": {"type": "xml"}})
    with pytest.raises(InputError, match=r"^text\.format\.name: must be 1-64 characters"):
        spec_from_text_param({"format": {"type": "json_schema", "name": "", "schema": {}}})
    assert spec_from_text_param(None) is None and spec_from_text_param({"verbosity": "low"}) is None


def test_what_the_openai_sdk_sends_is_accepted() -> None:
    """`parse(response_format=Invoice)` / `responses.parse(text_format=Invoice)`: pydantic's schema, strict: true."""
    # The SDK's own conversion (private modules of openai, a dev dependency: a rename must fail here, not skip).
    import openai.lib._parsing._completions as chat_sdk
    import openai.lib._parsing._responses as responses_sdk
    from pydantic import BaseModel, Field

    class Line(BaseModel):
        item: str = Field(max_length=6)
        qty: int = Field(ge=1, le=99)

    class Invoice(BaseModel):
        currency: Literal["EUR", "USD", "JPY"]
        paid: bool
        lines: list[Line] = Field(min_length=1, max_length=2)

    chat = chat_sdk.type_to_response_format_param(Invoice)
    text_format = responses_sdk.type_to_text_format_param(Invoice)
    assert chat["json_schema"]["strict"] is True and text_format["strict"] is True
    expected = json_schema_spec(chat["json_schema"]["schema"], name="Invoice", strict=True)
    assert spec_from_response_format(chat) == expected
    assert spec_from_text_format(text_format) == expected
    assert spec_from_text_param({"format": text_format, "verbosity": "low"}) == expected


def test_decoded_structs_give_the_same_specs() -> None:
    """The server hands over what msgspec decoded from the request body; JSON values go through the same types."""
    schema = SCHEMAS["enums"]
    chat = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema, "strict": True}}
    decoded = msgspec.convert(chat, ResponseFormat)
    assert isinstance(decoded, ResponseFormatJsonSchema) and decoded.json_schema.schema == schema
    assert spec_from_response_format(decoded) == spec_from_response_format(chat)
    inline = {"type": "json_schema", "name": "invoice", "schema": schema}
    text = msgspec.convert({"format": inline}, TextParam)
    assert isinstance(text.format, TextFormatJsonSchema)
    assert spec_from_text_param(text) == spec_from_text_format(inline) == json_schema_spec(schema, name="invoice",
                                                                                            strict=False)
    assert spec_from_response_format(msgspec.convert({"type": "text"}, ResponseFormat)) is None
    assert spec_from_text_param(msgspec.convert({"format": {"type": "json_object"}}, TextParam)) == json_object_spec()
    with pytest.raises(InputError, match=r"^text\.format\.schema: missing"):
        spec_from_text_param(msgspec.convert({"format": {"type": "json_schema", "name": "x"}}, TextParam))
