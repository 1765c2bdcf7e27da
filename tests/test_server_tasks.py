"""Open WebUI's background tasks through the live server: answered at once, without the model, with JSON Open
WebUI parses (streamed or not); with --model-tasks they go to the model like any text request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server import ServerSettings, create_app
from tests import fakes
from tests.conftest import fixture_tokenizer
from tests.helpers import LiveServer
from tests.owui_tasks import TASKS, parsed_answer, task_body

pytestmark = pytest.mark.server

REPLY = "# Quarterly report"
KEY = "sk-tasks"
ANSWERED_WITHIN_S = 0.5  # well under a second, on a busy 2-core test machine included
EXPECTED = {"title": "Quarterly report", "tags": [], "follow-ups": [], "queries": [], "autocomplete": "",
            "emoji": "🙂"}


def serve(model_tasks: bool) -> Iterator[tuple[LiveServer, fakes.RecordingBackend]]:
    backend = fakes.RecordingBackend(fixture_tokenizer(), REPLY)
    settings = ServerSettings(mode="tiny", api_key=KEY, model_tasks=model_tasks)
    with LiveServer(create_app(fakes.fixture_engine(backend), settings)) as server:
        yield server, backend


@pytest.fixture(scope="module")
def answered() -> Iterator[tuple[LiveServer, fakes.RecordingBackend]]:
    yield from serve(model_tasks=False)


@pytest.fixture(scope="module")
def to_model() -> Iterator[tuple[LiveServer, fakes.RecordingBackend]]:
    yield from serve(model_tasks=True)


def post(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"})


@pytest.mark.parametrize("name", list(TASKS))
def test_open_webui_task_is_answered_at_once_without_the_model(answered, name: str) -> None:
    server, backend = answered
    prompt, key = TASKS[name]
    extra = {"max_tokens": 4} if name == "emoji" else {}  # as Open WebUI sends them
    before = len(backend.seen)
    started = time.monotonic()
    response = post(server, task_body(prompt, **extra))
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert elapsed < ANSWERED_WITHIN_S, f"{name} took {elapsed:.2f} s"
    assert len(backend.seen) == before, "the task reached the model"
    completion = response.json()
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert completion["model"] == "deepseek-ocr" and completion["object"] == "chat.completion"
    assert parsed_answer(choice["message"]["content"], key) == EXPECTED[name]


def test_a_streamed_task_is_answered_as_a_stream(answered) -> None:
    server, backend = answered
    prompt, key = TASKS["title"]
    before = len(backend.seen)
    body = task_body(prompt, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert parsed_answer(text, key) == "Quarterly report"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert "usage" in chunks[-1] and not chunks[-1]["choices"]
    assert len(backend.seen) == before


def test_tasks_keep_the_key_and_the_model_checks(answered) -> None:
    server, _ = answered
    prompt, _ = TASKS["tags"]
    no_key = httpx.post(f"{server.base}/v1/chat/completions", json=task_body(prompt), timeout=30)
    assert no_key.status_code == 401
    other_model = post(server, {**task_body(prompt), "model": "gpt-4o"})
    assert other_model.status_code == 404


def test_an_ordinary_text_request_still_reaches_the_model(answered) -> None:
    server, backend = answered
    before = len(backend.seen)
    response = post(server, {"model": "deepseek-ocr", "messages": [{"role": "user", "content": "Hello there."}]})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == REPLY
    assert len(backend.seen) == before + 1


@pytest.mark.parametrize("name", ["title", "queries"])
def test_with_model_tasks_they_go_to_the_model(to_model, name: str) -> None:
    server, backend = to_model
    prompt, _ = TASKS[name]
    before = len(backend.seen)
    response = post(server, task_body(prompt))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == REPLY
    assert len(backend.seen) == before + 1
