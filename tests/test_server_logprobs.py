"""Per-token log-probabilities through the live server (OpenAI's shape, whole and streamed, both APIs), and the
request fields this model cannot honour: refused with a 400 naming them when honouring them would change the
answer, accepted when leaving them out changes nothing (the tools Open WebUI sends with every chat)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from common.engine.engine import Engine
from common.engine.sampling import SamplingParams
from common.model.families import resolve_mode
from server import ServerSettings, create_app
from tests.conftest import FIXTURES, MODEL_DIR
from tests.helpers import LiveServer, data_url

pytestmark = pytest.mark.server

DOC_IMAGE = FIXTURES / "images" / "doc_text.png"
MAX_TOKENS = 10
KEEP = {"grounding": "keep"}  # the text exactly as generated, so the tokens' bytes add up to it


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(str(MODEL_DIR), backend="torch", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def live(engine: Engine) -> Iterator[LiveServer]:
    with LiveServer(create_app(engine, ServerSettings(mode="tiny", max_new_tokens=16))) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base}/v1", api_key="unused", max_retries=0, timeout=60)


def messages() -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(DOC_IMAGE)}},
                                         {"type": "text", "text": "Free OCR."}]}]


def engine_logprobs(engine: Engine, top: int) -> list[Any]:
    from common.documents.images import load_image

    prepared = engine.prepare("<image>\nFree OCR.", [load_image(DOC_IMAGE)], resolve_mode("tiny"))
    result = engine.generate(prepared, SamplingParams(max_new_tokens=MAX_TOKENS, logprobs=top))
    assert result.logprobs is not None
    return result.logprobs


def as_tuples(items: list[Any]) -> list[tuple[Any, ...]]:
    return [(i.token, round(i.logprob, 6), bytes(i.bytes), [(t.token, round(t.logprob, 6)) for t in i.top_logprobs])
            for i in items]


def test_chat_logprobs_whole_and_streamed(client: openai.OpenAI, engine: Engine) -> None:
    expected = engine_logprobs(engine, 3)
    completion = client.chat.completions.create(model="deepseek-ocr", messages=messages(), max_tokens=MAX_TOKENS,
                                                logprobs=True, top_logprobs=3, extra_body=KEEP)
    content = completion.choices[0].logprobs.content
    assert len(content) == len(expected) == completion.usage.completion_tokens
    for item, entry in zip(content, expected, strict=True):
        assert item.logprob == pytest.approx(entry.logprob, abs=1e-6) and item.logprob <= 0.0
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(entry.top_logprobs, abs=1e-6)
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the most likely
    assert b"".join(bytes(item.bytes) for item in content).decode() == completion.choices[0].message.content

    streamed: list[Any] = []
    for chunk in client.chat.completions.create(model="deepseek-ocr", messages=messages(), max_tokens=MAX_TOKENS,
                                                logprobs=True, top_logprobs=3, stream=True, extra_body=KEEP):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed.extend(choice.logprobs.content)
    assert as_tuples(streamed) == as_tuples(content)


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="deepseek-ocr", messages=messages(), max_tokens=4)
    assert completion.choices[0].logprobs is None
    plain = client.chat.completions.create(model="deepseek-ocr", messages=messages(), max_tokens=4, logprobs=True)
    assert all(item.top_logprobs == [] for item in plain.choices[0].logprobs.content)


def test_responses_logprobs_whole_and_streamed(client: openai.OpenAI, engine: Engine) -> None:
    expected = engine_logprobs(engine, 2)
    items = [{"role": "user", "content": [{"type": "input_image", "image_url": data_url(DOC_IMAGE)},
                                          {"type": "input_text", "text": "Free OCR."}]}]
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 2, "max_output_tokens": MAX_TOKENS,
             "extra_body": KEEP}
    response = client.responses.create(model="deepseek-ocr", input=items, **asked)
    logprobs = response.output[0].content[0].logprobs
    assert [round(i.logprob, 5) for i in logprobs] == [round(e.logprob, 5) for e in expected]
    assert all(len(i.top_logprobs) == 2 for i in logprobs)

    deltas, done = [], None
    for event in client.responses.create(model="deepseek-ocr", input=items, stream=True, **asked):
        if event.type == "response.output_text.delta":
            deltas.extend(event.logprobs)
        if event.type == "response.output_text.done":
            done = event.logprobs
    assert [round(i.logprob, 5) for i in deltas] == [round(i.logprob, 5) for i in logprobs]
    assert done is not None and len(done) == len(logprobs)


@pytest.mark.parametrize(("field", "value"), [
    ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "lookup"}}),
    ("function_call", {"name": "lookup"}),
    ("logit_bias", {"100": 5}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -0.5),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "hello"}),
    ("top_logprobs", 3),  # without logprobs: true
    ("top_logprobs", 21),
])
def test_fields_that_would_change_the_answer_are_refused(live: LiveServer, field: str, value: Any) -> None:
    body = {"model": "deepseek-ocr", "messages": [{"role": "user", "content": "hi"}], field: value}
    if field == "top_logprobs" and value == 21:
        body["logprobs"] = True
    reply = httpx.post(f"{live.base}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field


def test_open_webui_tools_without_tool_choice_are_accepted(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "a built-in tool",
                                               "parameters": {"type": "object", "properties": {
                                                   "query": {"type": "string"}}, "required": ["query"]}}}
             for i in range(36)]
    completion = client.chat.completions.create(model="deepseek-ocr", messages=messages(), max_tokens=4,
                                                tools=tools, presence_penalty=0.0, modalities=["text"])
    assert completion.choices[0].message.tool_calls in (None, [])
    assert completion.usage.completion_tokens > 0


def test_responses_refuses_a_chat_style_response_format(live: LiveServer) -> None:
    body = {"model": "deepseek-ocr", "input": "hi", "response_format": {"type": "json_object"}}
    reply = httpx.post(f"{live.base}/v1/responses", json=body, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "response_format"
