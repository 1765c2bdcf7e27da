"""The OpenAI wire types: what clients send decodes, unknown fields are ignored, bad values are refused."""

from __future__ import annotations

import json
import re

import msgspec
import pytest

from common.engine.sampling import stop_strings
from common.serve.schema import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    ResponseObject,
    ResponsesRequest,
    encode,
    error_body,
    new_id,
)


def decode_chat(payload: dict) -> ChatCompletionRequest:
    return msgspec.json.decode(json.dumps(payload), type=ChatCompletionRequest)


def test_chat_request_with_parts_and_unknown_fields() -> None:
    request = decode_chat({
        "model": "deepseek-ocr",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "Free OCR."},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}},
                {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
                {"type": "input_audio", "input_audio": {"data": "x"}},  # unknown part type: kept, skipped later
            ]},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 100,
        "stop": "</s>",
        "mode": "gundam",
        "base_size": 1024,
        "crop_mode": True,
        "no_repeat_ngram_size": 30,
        "ngram_window": 90,
        "frequency_penalty": 0.5,  # unknown to us: ignored
        "metadata": {"chat_id": "abc"},  # Open WebUI extras: ignored
    })
    user = request.messages[1]
    assert isinstance(user.content, list)
    assert [p.type for p in user.content] == ["text", "image_url", "file", "input_audio"]
    assert user.content[1].image_url.url == "data:image/png;base64,AAAA"
    assert user.content[2].file.file_data.startswith("data:application/pdf")
    assert request.messages[0].content == "be brief"
    assert request.stream and request.stream_options.include_usage
    assert (request.max_completion_tokens, request.max_tokens) == (100, None)
    assert (request.mode, request.base_size, request.crop_mode) == ("gundam", 1024, True)
    assert (request.no_repeat_ngram_size, request.ngram_window) == (30, 90)
    assert stop_strings(request.stop) == ("</s>",)


def test_chat_request_defaults() -> None:
    request = decode_chat({"messages": [{"role": "user", "content": "hi"}]})
    assert request.model == "deepseek-ocr"
    assert not request.stream and request.temperature is None and request.max_tokens is None
    assert stop_strings(["a", "", "b"]) == ("a", "b") and stop_strings(None) == ()


@pytest.mark.parametrize(
    "change",
    [
        {"messages": "hello"},
        {"max_tokens": 0},
        {"max_tokens": "ten"},
        {"temperature": -1},
        {"temperature": 3},
        {"top_p": 0},
        {"n": 2},
        {"base_size": 0},
        {"no_repeat_ngram_size": -1},
        {"messages": [{"content": "no role"}]},
    ],
)
def test_chat_request_rejects_bad_values(change: dict) -> None:
    payload = {"messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(msgspec.ValidationError):
        decode_chat(payload)


def test_responses_request_forms() -> None:
    simple = msgspec.json.decode(b'{"model": "deepseek-ocr", "input": "hello"}', type=ResponsesRequest)
    assert simple.input == "hello"
    items = msgspec.json.decode(json.dumps({
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "Free OCR."},
            {"type": "input_image", "image_url": "https://example.com/a.png"},
        ]}],
        "max_output_tokens": 64,
        "reasoning": {"effort": "low"},
    }), type=ResponsesRequest)
    assert isinstance(items.input, list)
    assert items.input[0].content[1].image_url == "https://example.com/a.png"  # a plain string in this API
    assert items.max_output_tokens == 64


def test_chunk_and_error_encoding() -> None:
    chunk = ChatCompletionChunk("chatcmpl-1", 1, "deepseek-ocr", [ChunkChoice(0, ChunkDelta(content="é"))])
    decoded = json.loads(encode(chunk))
    assert decoded["object"] == "chat.completion.chunk"
    assert decoded["choices"][0]["delta"] == {"content": "é"}  # unset role omitted
    assert decoded["choices"][0]["finish_reason"] is None
    error = json.loads(encode(error_body("bad", "invalid_request_error", code="x")))
    assert error == {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": "x"}}
    assert new_id("chatcmpl").startswith("chatcmpl-") and new_id("resp").startswith("resp_")


def test_response_object_output_text() -> None:
    from common.serve.schema import OutputMessage, OutputText

    response = ResponseObject("resp_1", 0, "deepseek-ocr", [OutputMessage("msg_1", [OutputText("a"), OutputText("b")])])
    assert response.output_text == "ab"
    assert json.loads(encode(response))["output"][0]["content"][0] == {"text": "a", "type": "output_text",
                                                                       "annotations": [], "logprobs": []}


def test_response_format_and_text_format_shapes() -> None:
    from common.engine.structured import (
        ResponseFormatJsonObject,
        ResponseFormatJsonSchema,
        ResponseFormatText,
        TextFormatJsonSchema,
    )

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat = decode_chat({"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True, "description": "d"}}})
    assert isinstance(chat.response_format, ResponseFormatJsonSchema)
    assert (chat.response_format.json_schema.name, chat.response_format.json_schema.schema) == ("a", schema)
    for kind, struct in (("text", ResponseFormatText), ("json_object", ResponseFormatJsonObject)):
        request = decode_chat({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": kind}})
        assert isinstance(request.response_format, struct)
    assert decode_chat({"messages": [{"role": "user", "content": "hi"}]}).response_format is None
    responses = msgspec.json.decode(json.dumps({"input": "hi", "text": {"verbosity": "low", "format": {
        "type": "json_schema", "name": "a", "schema": schema, "strict": None}}}), type=ResponsesRequest)
    assert isinstance(responses.text.format, TextFormatJsonSchema) and responses.text.format.schema == schema
    assert msgspec.json.decode(b'{"input": "hi", "text": {}}', type=ResponsesRequest).text.format is None


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"response_format": "json"}, "$.response_format"),
        ({"response_format": {"type": "xml"}}, "$.response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "$.response_format"),  # msgspec: missing field `json_schema`
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!"}}},
         "$.response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
         "$.response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}},
         "$.response_format.json_schema.strict"),
    ],
)
def test_bad_response_format_shape_names_the_field(change: dict, where: str) -> None:
    """Litestar turns the path of msgspec's error into the 400's `param` (server.py)."""
    with pytest.raises(msgspec.ValidationError, match=re.escape(f"`{where}`")):
        decode_chat({"messages": [{"role": "user", "content": "hi"}], **change})


def test_bad_text_format_shape_names_the_field() -> None:
    with pytest.raises(msgspec.ValidationError, match=re.escape("`$.text.format.type`")):
        msgspec.json.decode(b'{"input": "hi", "text": {"format": {"type": "xml"}}}', type=ResponsesRequest)
