"""Structured output through the server: chat `response_format` and Responses `text.format`, sent by the official
`openai` client to a live server running the tiny random-weight model (its free output is gibberish, so JSON that
parses and validates proves the constraint). Streamed and not, `parse()` helpers, `length`, 400s naming the field.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from common.engine.engine import Engine
from server import ServerSettings, create_app
from tests.conftest import FIXTURES, MODEL_DIR
from tests.helpers import LiveServer, data_url
from tests.structured_cases import SCHEMAS, UNBOUNDED, parses, validated

API_KEY = "test-key-123"
DOC_IMAGE = FIXTURES / "images" / "doc_text.png"

pytestmark = pytest.mark.server

MAX_TOKENS = 160


def schema_params(names: list[str], quick: str) -> list[Any]:
    """The schemas by name, all but `quick` marked slow (each request takes about a second)."""
    return [pytest.param(name, marks=[] if name == quick else [pytest.mark.slow]) for name in names]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    loaded = Engine.load(str(MODEL_DIR), backend="torch", device="cpu", dtype="float32")
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def live(engine: Engine) -> Iterator[LiveServer]:
    settings = ServerSettings(mode="tiny", api_key=API_KEY, max_new_tokens=200, keepalive_s=1.0)
    with LiveServer(create_app(engine, settings)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Any:
    return openai.OpenAI(base_url=f"{live.base}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def messages(text: str = "Extract the fields as JSON.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(DOC_IMAGE)}},
                                         {"type": "text", "text": text}]}]


def response_input(text: str = "Extract the fields as JSON.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "input_image", "image_url": data_url(DOC_IMAGE)},
                                         {"type": "input_text", "text": text}]}]


def json_schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def streamed_chat(client: Any, **kwargs: Any) -> tuple[str, str | None]:
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="deepseek-ocr", stream=True, **kwargs):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish


# ------------------------------------------------------------------------------------------- chat


@pytest.mark.parametrize("name", schema_params(list(SCHEMAS), quick="enums"))
def test_chat_json_schema_streamed_and_not(client: Any, name: str) -> None:
    schema = SCHEMAS[name]
    kwargs = {"messages": messages(), "max_tokens": MAX_TOKENS, "response_format": json_schema_format(name, schema)}
    completion = client.chat.completions.create(model="deepseek-ocr", **kwargs)
    content = completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    validated(content, schema)
    text, finish = streamed_chat(client, **kwargs)
    assert (text, finish) == (content, "stop")  # deltas of the same JSON text
    sampled = client.chat.completions.create(model="deepseek-ocr", temperature=0.9, seed=5, **kwargs)
    validated(sampled.choices[0].message.content, schema)


def test_chat_json_object(client: Any) -> None:
    for seed in (1, 2, 3):
        completion = client.chat.completions.create(model="deepseek-ocr", messages=messages(), max_tokens=40,
                                                    temperature=0.7, seed=seed,
                                                    response_format={"type": "json_object"})
        content, finish = completion.choices[0].message.content, completion.choices[0].finish_reason
        assert content.startswith("{")
        if finish == "stop":
            assert isinstance(json.loads(content), dict)
        else:
            assert finish == "length" and completion.usage.completion_tokens == 40


class Line(BaseModel):
    item: str = Field(max_length=6)
    qty: int = Field(ge=1, le=99)


class Invoice(BaseModel):
    currency: Literal["EUR", "USD", "JPY"]
    paid: bool
    lines: list[Line] = Field(min_length=1, max_length=2)


@pytest.mark.slow
def test_openai_parse_helpers(client: Any) -> None:
    completion = client.chat.completions.parse(model="deepseek-ocr", messages=messages(), max_tokens=MAX_TOKENS,
                                               response_format=Invoice)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Invoice) and 1 <= len(parsed.lines) <= 2
    response = client.responses.parse(model="deepseek-ocr", input=response_input(), max_output_tokens=MAX_TOKENS,
                                      text_format=Invoice)
    assert isinstance(response.output_parsed, Invoice)
    assert response.output_parsed == parsed  # same request, greedy: the same JSON either way
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="deepseek-ocr", messages=messages(), max_tokens=5,
                                      response_format=Invoice)


@pytest.mark.slow
def test_budget_ends_the_json_early_with_length(client: Any) -> None:
    kwargs = {"messages": messages(), "response_format": json_schema_format("lines", SCHEMAS["array_min_max_items"])}
    full = client.chat.completions.create(model="deepseek-ocr", max_tokens=MAX_TOKENS, **kwargs)
    cut = client.chat.completions.create(model="deepseek-ocr", max_tokens=9, **kwargs)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 9
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)
    assert not parses(cut.choices[0].message.content)
    text, finish = streamed_chat(client, max_tokens=9, **kwargs)
    assert (text, finish) == (cut.choices[0].message.content, "length")
    endless = client.responses.create(model="deepseek-ocr", input=response_input(), max_output_tokens=20,
                                      text={"format": {"type": "json_schema", "name": "t", "schema": UNBOUNDED}})
    assert endless.status == "incomplete" and endless.incomplete_details.reason == "max_output_tokens"


# ------------------------------------------------------------------------------------------- responses


@pytest.mark.parametrize("name", schema_params(["nested_objects", "numbers_with_bounds", "string_patterns"],
                                                quick="string_patterns"))
def test_responses_text_format_streamed_and_not(client: Any, name: str) -> None:
    schema = SCHEMAS[name]
    text_format = {"format": {"type": "json_schema", "name": name, "schema": schema, "strict": True}}
    response = client.responses.create(model="deepseek-ocr", input=response_input(), max_output_tokens=MAX_TOKENS,
                                       text=text_format)
    assert response.status == "completed"
    validated(response.output_text, schema)
    deltas, final = [], None
    for event in client.responses.create(model="deepseek-ocr", input=response_input(),
                                         max_output_tokens=MAX_TOKENS, text=text_format, stream=True):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.completed":
            final = event.response
    assert final is not None and "".join(deltas) == final.output_text == response.output_text
    json_object = client.responses.create(model="deepseek-ocr", input=response_input(), max_output_tokens=40,
                                          text={"format": {"type": "json_object"}})
    assert json_object.output_text.startswith("{")


# ------------------------------------------------------------------------------------------- batching


@pytest.mark.slow
def test_concurrent_mixed_requests_leave_free_text_unchanged(client: Any, live: LiveServer) -> None:
    free = [{"messages": messages(f"Free OCR. {i}"), "max_tokens": 20 + i} for i in range(3)]
    constrained = [{"messages": messages(), "max_tokens": MAX_TOKENS,
                    "response_format": json_schema_format(name, SCHEMAS[name])} for name in SCHEMAS]

    def ask(kwargs: dict[str, Any]) -> str:
        return client.chat.completions.create(model="deepseek-ocr", **kwargs).choices[0].message.content

    alone = [ask(kwargs) for kwargs in free]
    with concurrent.futures.ThreadPoolExecutor(len(free) + len(constrained)) as pool:
        futures = [pool.submit(ask, kwargs) for kwargs in [*constrained, *free]]
        results = [f.result() for f in futures]
    assert results[len(constrained):] == alone
    for name, text in zip(SCHEMAS, results, strict=False):
        validated(text, SCHEMAS[name])
    assert not any(parses(text) for text in alone)


# ------------------------------------------------------------------------------------------- bad requests


BAD_FORMATS = [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),  # msgspec names the object lacking a field
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": json_schema_format("x", {"type": "strange"})}, "response_format.json_schema.schema"),
    ({"response_format": json_schema_format("x", {"type": "object", "properties": {"a": {"$ref": "#/nope"}}})},
     "response_format.json_schema.schema"),
    ({"response_format": json_schema_format("x", {"type": "string", "pattern": "(unclosed"})},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    # llguidance panics on this one (while formatting its error): still a 400
    ({"response_format": json_schema_format("x", {"type": "integer", "exclusiveMinimum": {"a" * 61 + "é" * 40: 1}})},
     "response_format.json_schema.schema"),
]


@pytest.mark.parametrize(("extra", "param"), BAD_FORMATS)
def test_invalid_response_format_is_a_400_naming_the_field(
    live: LiveServer, engine: Engine, extra: dict[str, Any], param: str
) -> None:
    steps = engine.core.steps
    body = {"model": "deepseek-ocr", "messages": messages(), **extra}
    response = httpx.post(f"{live.base}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    # A wrong shape is refused as the body is decoded (msgspec, worded by server.py), a bad schema by llguidance.
    message = error["message"]
    decoding = message.startswith("invalid request body: ") and message.endswith(f" (field {param})")
    assert (decoding or message.startswith(f"{param}: ")) and "\n" not in message
    assert engine.core.steps == steps  # refused before any model work


def test_invalid_text_format_through_the_openai_client(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="deepseek-ocr", input="hi", text={"format": {
            "type": "json_schema", "name": "x", "schema": {"type": "object", "required": 3}}})
    assert caught.value.param == "text.format.schema" and "invalid JSON schema" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="deepseek-ocr", messages=messages(),
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert caught.value.param == "response_format.json_schema.schema"
