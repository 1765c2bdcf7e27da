"""The OpenAI request shapes of structured output (chat `response_format`, Responses `text.format`) as JsonSpecs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from common.engine.structured.spec import _NAME_PATTERN, JsonSpec, json_object_spec, json_schema_spec
from common.errors import InputError

# ------------------------------------------------------------------------------------------ request shapes
# The OpenAI shapes, as the official SDK sends them, validated by msgspec (the server decodes request bodies
# into them, so a wrong shape is a 400 naming the field). The JSON schema itself stays a free-form object:
# llguidance checks it (json_schema_spec).


class JsonSchemaFormat(Struct, kw_only=True):
    """Chat `response_format.json_schema`; the Responses API has the same fields inline in `text.format`."""

    name: Annotated[str, Meta(pattern=_NAME_PATTERN)]
    schema: dict[str, Any] | UnsetType = UNSET  # optional in OpenAI's chat API, refused when absent (nothing to match)
    description: str | None = None
    strict: bool | None = None  # null: OpenAI's default, false; every schema is enforced fully either way


class ResponseFormatText(Struct, tag_field="type", tag="text"):
    """Unconstrained text (the default)."""


class ResponseFormatJsonObject(Struct, tag_field="type", tag="json_object"):
    """Any JSON object."""


class ResponseFormatJsonSchema(Struct, tag_field="type", tag="json_schema"):
    """Chat completions: JSON matching `json_schema.schema`."""

    json_schema: JsonSchemaFormat


class TextFormatJsonSchema(JsonSchemaFormat, tag_field="type", tag="json_schema"):
    """Responses API `text.format`: JSON matching `schema` (the fields are inline)."""


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema  # chat `response_format`
TextFormat = ResponseFormatText | ResponseFormatJsonObject | TextFormatJsonSchema  # Responses `text.format`


class TextParam(Struct):
    """Responses API `text` (`{"format": {...}, "verbosity"?}`; fields other than `format` are ignored)."""

    format: TextFormat | None = None


_FORMAT_TYPES = "'text', 'json_object' or 'json_schema'"
# What each field must be, in the words of an error, by the field's name.
_MUST_BE = {
    "type": _FORMAT_TYPES,
    "json_schema": "an object with 'name' and 'schema'",
    "name": "1-64 characters of a-z, A-Z, 0-9, '_' or '-'",
    "schema": "a JSON object (the JSON schema)",
    "strict": "true or false",
    "description": "a string",
    "format": 'an object such as {"type": "json_object"}',
}
_MSGSPEC_ERROR = re.compile(r"(?P<what>.*?)(?: - at `\$(?P<at>.*)`)?", re.DOTALL)


def _typed(value: Any, kind: Any, where: str, must_be: str) -> Any:
    """`value` as `kind` (a Struct from a decoded request is taken as it is; JSON values are validated by msgspec,
    as the server does). An InputError names the field and what it must be, e.g. `response_format.type: ...`."""
    if value is None or isinstance(value, Struct):
        return value
    try:
        return msgspec.convert(value, kind, strict=False)  # strict=False: as Litestar decodes request bodies
    except msgspec.ValidationError as exc:
        match = _MSGSPEC_ERROR.fullmatch(str(exc))
        assert match is not None  # the pattern matches any text
        keys = [key for key in (match["at"] or "").split(".") if key]
        missing = re.fullmatch(r"Object missing required field `(.+)`", match["what"])
        keys += [missing[1]] if missing else []
        param = ".".join([where, *keys])
        hint = _MUST_BE.get(keys[-1]) if keys else must_be
        if hint is None:  # not a field of these shapes: msgspec's own words
            raise InputError(f"{param}: {match['what']}", param=param) from None
        if missing:
            raise InputError(f"{param}: must be {hint}; it is missing", param=param) from None
        found = value
        for key in keys:
            found = found.get(key) if isinstance(found, Mapping) else None
        raise InputError(f"{param}: must be {hint}, got {found!r}", param=param) from None


def _spec_of_format(value: Any, where: str) -> JsonSpec | None:
    if value is None or isinstance(value, ResponseFormatText):
        return None
    if isinstance(value, ResponseFormatJsonObject):
        return json_object_spec()
    options: JsonSchemaFormat = value
    if isinstance(value, ResponseFormatJsonSchema):
        options, where = value.json_schema, f"{where}.json_schema"
    if options.schema is UNSET:
        raise InputError(
            f"{where}.schema: missing; give the JSON schema the output must match", param=f"{where}.schema"
        )
    return json_schema_spec(options.schema, name=options.name, strict=bool(options.strict), where=f"{where}.schema")


def spec_from_response_format(value: ResponseFormat | Any, where: str = "response_format") -> JsonSpec | None:
    """Chat completions `response_format`: None (absent or type "text") means unconstrained output.

    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}` or
    `{"type": "json_object"}`, as a `ResponseFormat` Struct (a decoded request) or as JSON values.
    """
    return _spec_of_format(_typed(value, ResponseFormat, where, _MUST_BE["format"]), where)


def spec_from_text_format(value: TextFormat | Any, where: str = "text.format") -> JsonSpec | None:
    """Responses API `text.format`: the same types with the schema fields inline.

    `{"type": "json_schema", "name", "schema", "strict"?, "description"?}` or `{"type": "json_object"}`.
    """
    return _spec_of_format(_typed(value, TextFormat, where, _MUST_BE["format"]), where)


def spec_from_text_param(value: TextParam | Any, where: str = "text") -> JsonSpec | None:
    """Responses API `text` (`{"format": {...}, "verbosity"?}`): its `format`, as `spec_from_text_format`."""
    param = _typed(value, TextParam, where, 'an object such as {"format": {"type": "json_object"}}')
    return None if param is None else spec_from_text_format(param.format, f"{where}.format")


