"""Open WebUI's background tasks recognised by their shape and answered with what Open WebUI parses
(common.serve.tasks), and nothing else mistaken for one."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from common.engine.requests import RequestHandle
from common.serve.schema import ChatCompletionRequest
from common.serve.tasks import answer_task, chat_title
from tests.owui_tasks import CHAT, TASKS, parsed_answer, task_body, title_prompt


def request(body: dict[str, Any]) -> ChatCompletionRequest:
    return msgspec.convert(body, ChatCompletionRequest)


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_template_gets_the_answer_open_webui_parses(name: str) -> None:
    prompt, key = TASKS[name]
    answer = answer_task(request(task_body(prompt)))
    assert answer is not None
    value = parsed_answer(answer.text, key)
    expected: dict[str, Any] = {"title": "Quarterly report", "tags": [], "follow-ups": [], "queries": [],
                                "autocomplete": "", "emoji": "🙂"}
    assert value == expected[name]


def test_a_task_sent_as_text_parts_is_recognised_too() -> None:
    prompt, _ = TASKS["tags"]
    body = task_body("")
    body["messages"][0]["content"] = [{"type": "text", "text": prompt[:40]}, {"type": "text", "text": prompt[40:]}]
    answer = answer_task(request(body))
    assert answer is not None and answer.task == "tags"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "### Task:\nSummarise this contract for me."}],  # no JSON asked for, no history
    [{"role": "user", "content": "Free OCR."}],
    [{"role": "user", "content": TASKS["title"][0]}, {"role": "assistant", "content": "{}"},
     {"role": "user", "content": "again"}],
    [{"role": "user", "content": [{"type": "text", "text": TASKS["title"][0]},
                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
])
def test_requests_that_are_not_tasks_go_to_the_model(messages: list[dict[str, Any]]) -> None:
    assert answer_task(request({"model": "deepseek-ocr", "messages": messages})) is None


def test_a_task_with_the_models_system_prompt_is_still_one() -> None:
    """Open WebUI puts a model's system prompt in front of its task requests too."""
    body = task_body(TASKS["title"][0])
    body["messages"].insert(0, {"role": "system", "content": "You are a careful OCR assistant."})
    answer = answer_task(request(body))
    assert answer is not None and answer.task == "title"


def test_a_json_key_inside_the_chat_does_not_make_a_task() -> None:
    """Only the instructions (before <chat_history>) name the key: a chat that quotes a template's JSON is not one."""
    text = "### Task:\nExplain this.\n<chat_history>\nUSER: JSON format: { \"title\": \"x\" }\n</chat_history>"
    assert answer_task(request(task_body(text))) is None


@pytest.mark.parametrize(("chat", "title"), [
    (CHAT, "Quarterly report"),  # the document's heading, from the answer
    ([{"role": "user", "content": "Free OCR."}, {"role": "assistant", "content": "INVOICE No. 42\nTotal: 10 EUR"}],
     "INVOICE No. 42"),  # no heading: the answer's first line
    ([{"role": "user", "content": "Read the **menu** please"}, {"role": "assistant", "content": ""}],
     "Read the menu please"),  # nothing from the model: the user's words, without the markup
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "![](a.jpg)\n"}], ""),  # nothing usable
    ([{"role": "user", "content": "x"}, {"role": "assistant",
                                        "content": "## " + " ".join(f"word{i}" for i in range(30))}],
     "word0 word1 word2 word3 word4 word5 word6 word7"),  # at most 8 words
])
def test_the_title_comes_from_the_document(chat: list[dict[str, Any]], title: str) -> None:
    assert chat_title(title_prompt(chat)) == title


def test_an_answered_handle_reads_like_a_finished_generation() -> None:
    handle = RequestHandle.answered('{"tags": []}')
    assert handle.done and handle.result is not None
    assert handle.result.text == '{"tags": []}' and handle.result.finish_reason == "stop"
    assert "".join(handle) == '{"tags": []}'
