"""Requests captured from the real Open WebUI 0.12.4 (.ci/openwebui_e2e.py --save-fixtures), replayed against the
live server: its `PUT /process` with the headers exactly as they arrived, its background task requests and its
chat request with a document (their envelopes as sent: `max_tokens` on the title task, its 36 tool schemas on the
chat request). The fixture keeps no Open WebUI prose: message texts are written here (tests/owui_tasks.py) and
tool descriptions were dropped when it was saved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server import ServerSettings, create_app
from tests import fakes
from tests.conftest import ROOT, fixture_tokenizer
from tests.helpers import LiveServer, make_pdf
from tests.owui_tasks import TASKS, parsed_answer

pytestmark = pytest.mark.server

CAPTURE = json.loads((ROOT / "tests" / "fixtures" / "openwebui" / "requests.json").read_text())
KEY = CAPTURE["process"]["headers"]["Authorization"].removeprefix("Bearer ")
REPLY = "# Inspection report"
TASK_NAMES = {"title": "title", "tags": "tags", "follow_ups": "follow-ups", "queries": "queries"}  # capture -> ours
ANSWERED_WITHIN_S = 0.5


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[LiveServer, fakes.RecordingBackend]]:
    backend = fakes.RecordingBackend(fixture_tokenizer(), REPLY)
    with LiveServer(create_app(fakes.fixture_engine(backend), ServerSettings(mode="tiny", api_key=KEY))) as server:
        yield server, backend


def replay(server: LiveServer, captured: dict[str, Any], **body: Any) -> httpx.Response:
    """The captured request sent again: its method, path and headers as they were, the given body."""
    return httpx.request(captured["method"], f"{server.base}{captured['path']}", headers=captured["headers"],
                         timeout=60, **body)


def with_messages(captured: dict[str, Any], content: str) -> dict[str, Any]:
    """The captured JSON body with its (left out) message text written back: one user message, as captured."""
    assert [m["role"] for m in captured["body"]["messages"]] == ["user"]
    return {**captured["body"], "messages": [{"role": "user", "content": content}]}


def test_the_capture_is_the_real_client() -> None:
    assert CAPTURE["open_webui_version"] == "0.12.4"
    headers = CAPTURE["process"]["headers"]
    assert headers["User-Agent"].startswith("python-requests/") and headers["Content-Type"] == "application/pdf"
    assert {"X-Filename", "X-OpenWebUI-User-Id", "X-OpenWebUI-User-Role"} <= set(headers)
    assert set(CAPTURE["tasks"]) >= set(TASK_NAMES)
    assert len(CAPTURE["chat"]["body"]["tools"]) > 0


def test_the_captured_process_request_gives_one_item_per_page(served, tmp_path: Path) -> None:
    server, _ = served
    captured = CAPTURE["process"]
    pdf = make_pdf(tmp_path / "scan.pdf", len(captured["answer_metadata"])).read_bytes()
    response = replay(server, captured, content=pdf)
    assert response.status_code == 200, response.text
    items = response.json()
    assert len(items) == len(captured["answer_metadata"]) == 2
    for item, seen in zip(items, captured["answer_metadata"], strict=True):
        assert isinstance(item["page_content"], str) and item["page_content"].startswith(REPLY)
        metadata = item["metadata"]
        assert set(metadata) == set(seen)  # the fields Open WebUI stored in the real run, none missing or added
        for field in ("file_name", "content_type", "page", "page_label", "total_pages", "processing_engine"):
            assert metadata[field] == seen[field], field


@pytest.mark.parametrize("name", list(TASK_NAMES))
def test_each_captured_task_request_is_answered_at_once(served, name: str) -> None:
    server, backend = served
    captured = CAPTURE["tasks"][name]
    prompt, key = TASKS[TASK_NAMES[name]]
    before = len(backend.seen)
    started = time.monotonic()
    response = replay(server, captured, json=with_messages(captured, prompt))
    elapsed = time.monotonic() - started
    assert response.status_code == captured["status"] == 200, response.text
    assert elapsed < ANSWERED_WITHIN_S, f"{name} took {elapsed:.2f} s"
    assert len(backend.seen) == before, "the task reached the model"
    parsed_answer(response.json()["choices"][0]["message"]["content"], key)  # what Open WebUI parses


def test_the_captured_chat_request_with_a_document_reaches_the_model(served) -> None:
    server, backend = served
    captured = CAPTURE["chat"]
    assert captured["body"]["stream"] is True
    question = ("Answer from the context below.\n\n<context>\n<source id=\"1\" name=\"scanned-report.pdf\">"
                "Vessel: Northern Tern. Total fee due: 1,980.00 EUR</source>\n</context>\n\n"
                "Which vessel was inspected?")
    before = len(backend.seen)
    response = replay(server, captured, json=with_messages(captured, question))
    assert response.status_code == 200, response.text
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, lines[:-1]) if c["choices"])
    assert text == REPLY
    assert len(backend.seen) == before + 1
