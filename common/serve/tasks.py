"""Open WebUI's background tasks, answered at once: DeepSeek-OCR cannot write titles, tags, search queries,
follow-up suggestions, autocompletions or emoji, and Open WebUI waits for some of them (the query-generation task
runs before the user's own request whenever a file is attached).

Open WebUI sends each task as one user message holding its template filled in (open_webui/config.py,
DEFAULT_*_PROMPT_TEMPLATE): "### Task:", the instructions with the JSON it wants ("JSON format: { "title": ...
}"), then the chat in `<chat_history>`; the emoji task is one line of its own. A task is recognised by that
shape and the JSON key its instructions ask for (never by what the chat says), and answered with what Open
WebUI parses: the title from the chat's first Markdown heading (the document's, when the model read one) or first
line, and empty tags, queries, follow-ups and autocompletion, which make Open WebUI fall back to its defaults
(the user's message as the search query). With --model-tasks they go to the model instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from common.serve.schema import ChatCompletionRequest

TASK_HEADER = "### Task:"
HISTORY_OPEN, HISTORY_CLOSE = "<chat_history>", "</chat_history>"
EMOJI_TASK = "Your task is to reflect the speaker's likely facial expression through a fitting emoji."
EMOJI = "🙂"
# The key of the JSON object each template asks for, as its instructions show it, and the empty answer.
_ASKED_KEY = re.compile(r'\{\s*"(title|tags|follow_ups|queries|text)"\s*:')
EMPTY_ANSWERS = {"tags": [], "follow_ups": [], "queries": [], "text": ""}
TASK_NAMES = {"title": "title", "tags": "tags", "follow_ups": "follow-ups", "queries": "query generation",
              "text": "autocomplete"}
MAX_TITLE_CHARS = 60
MAX_TITLE_WORDS = 8
_ROLE_LINE = re.compile(r"^(USER|ASSISTANT|SYSTEM|TOOL): ?", re.MULTILINE)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_MARKUP = re.compile(r"!\[[^\]]*\]\([^)]*\)|<[^>]{1,200}>|[*_`~|>#\"]+|\[|\]\([^)]*\)")


@dataclass(frozen=True)
class TaskAnswer:
    task: str  # "title", "tags", "follow-ups", "query generation", "autocomplete", "emoji"
    text: str


def _task_text(body: ChatCompletionRequest) -> str | None:
    """The text of a request that has the shape of Open WebUI's tasks: one user message, text only (beside the
    model's system prompt, which Open WebUI adds to tasks too when one is set)."""
    messages = [message for message in body.messages if message.role not in ("system", "developer")]
    if len(messages) != 1 or messages[0].role != "user":
        return None
    content = messages[0].content
    if isinstance(content, str):
        return content
    if not content or any(part.type != "text" or part.text is None for part in content):
        return None
    return "".join(part.text or "" for part in content)


def _history(text: str) -> list[tuple[str, str]]:
    """(role, text) of each message Open WebUI wrote into `<chat_history>` as "ROLE: text" lines."""
    start = text.find(HISTORY_OPEN)
    end = text.rfind(HISTORY_CLOSE)
    inside = text[start + len(HISTORY_OPEN): end if end > start else len(text)]
    pieces = _ROLE_LINE.split(inside)
    return [(pieces[i], pieces[i + 1].strip()) for i in range(1, len(pieces) - 1, 2)]


def _shorten(line: str) -> str:
    words = _MARKUP.sub(" ", line).split()[:MAX_TITLE_WORDS]
    title = " ".join(words)
    if len(title) > MAX_TITLE_CHARS:
        title = title[:MAX_TITLE_CHARS].rsplit(" ", 1)[0]
    return title.strip(" -:;,.")


def chat_title(text: str) -> str:
    """A short title: the chat's first Markdown heading, else its first line, the answers' (the document, when the
    model read one) before the user's; "" when there is nothing (Open WebUI then uses the user's message)."""
    messages = sorted(_history(text), key=lambda message: message[0] != "ASSISTANT")
    for _, message in messages:
        for match in _HEADING.finditer(message):
            if title := _shorten(match.group(1)):
                return title
    for _, message in messages:
        for line in message.splitlines():
            if title := _shorten(line):
                return title
    return ""


def answer_task(body: ChatCompletionRequest) -> TaskAnswer | None:
    """The answer to an Open WebUI background task, or None when the request is not one."""
    text = _task_text(body)
    if text is None:
        return None
    if text.startswith(EMOJI_TASK):
        return TaskAnswer("emoji", EMOJI)
    if not text.lstrip().startswith(TASK_HEADER) or HISTORY_OPEN not in text:
        return None
    match = _ASKED_KEY.search(text[: text.find(HISTORY_OPEN)])
    if match is None:
        return None
    key = match.group(1)
    value = chat_title(text) if key == "title" else EMPTY_ANSWERS[key]
    return TaskAnswer(TASK_NAMES[key], json.dumps({key: value}, ensure_ascii=False))
