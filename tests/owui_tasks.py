"""Open WebUI 0.12.4's background task requests, filled in as Open WebUI fills them (open_webui/utils/task.py):
each is one user message holding a template (open_webui/config.py, DEFAULT_*_PROMPT_TEMPLATE) with the chat
written into `<chat_history>` as "ROLE: text" lines, sent with `"stream": false`.

The parts a server can recognise a task by are kept exactly as Open WebUI writes them: the "### Task:" heading,
the section headings, every line that shows the JSON wanted (`JSON format: { "title": ... }`, the queries
template's `{ "queries": [...] }` lines, the autocomplete template's `{ "text": "" }`), where the chat history
sits (and what follows it), the emoji template's first sentence. The guideline prose in between is written in
our own words (its wording carries nothing a server reads).
"""

from __future__ import annotations

from typing import Any

TASK_MODEL = "deepseek-ocr"

# The chat a task is about: an image read by the model, then a question about it.
CHAT = [
    {"role": "user", "content": "Free OCR."},
    {"role": "assistant", "content": "# Quarterly report\n\nRevenue grew by 12% in the third quarter."},
    {"role": "user", "content": "What was the growth?"},
]


def messages_text(messages: list[dict[str, Any]]) -> str:
    """`{{MESSAGES:END:n}}` filled in: one "ROLE: content" line per message (open_webui.utils.misc)."""
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


def title_prompt(messages: list[dict[str, Any]] = CHAT) -> str:
    return f"""### Task:
Write a short title for the chat history below.
### Guidelines:
- Name the main subject of the conversation in 2-4 words.
- No emojis, quotes or formatting; use the chat's language.
- Answer with the JSON object alone, no code fences and no other text.
### Output:
JSON format: {{ "title": "your concise title here" }}
### Examples:
- {{ "title": "Tax Forms" }},
- {{ "title": "Garden Planning" }}
### Chat History:
<chat_history>
{messages_text(messages[-2:])}
</chat_history>"""


def tags_prompt(messages: list[dict[str, Any]] = CHAT) -> str:
    return f"""### Task:
Give 1-3 broad tags for the themes of the chat history, and 1-3 narrower subtopic tags.

### Guidelines:
- Begin with general domains, then subfields that the conversation clearly covers
- For a very short or scattered chat, answer only ["General"]
- Use the chat's language

### Output:
JSON format: {{ "tags": ["tag1", "tag2", "tag3"] }}

### Chat History:
<chat_history>
{messages_text(messages[-6:])}
</chat_history>"""


def follow_ups_prompt(messages: list[dict[str, Any]] = CHAT) -> str:
    return f"""### Task:
Suggest 3-5 messages the user is likely to send next.
### Guidelines:
- Write them as the user would, in the user's language and tone.
- Do not repeat what has been answered already; strongest suggestion first.
- Answer with a JSON object whose "follow_ups" key holds an array of strings, nothing else.
### Output:
JSON format: {{ "follow_ups": ["Suggested next message 1", "Suggested next message 2", "Suggested next message 3"] }}
### Chat History:
<chat_history>
{messages_text(messages[-5:])}
</chat_history>"""


def queries_prompt(messages: list[dict[str, Any]] = CHAT, date: str = "2026-12-07") -> str:
    return f"""### Task:
Decide from the chat history whether search queries are needed, in the chat's language, and write 1-3 broad ones \
unless nothing more is needed; if no search is needed, return an empty list.

### Guidelines:
- Answer **only** with a JSON object.
- When writing queries, answer in the format: {{ "queries": ["query1", "query2"] }}, each query distinct and short.
- If no search can help at all, return: {{ "queries": [] }}.
- Today's date is: {date}.

### Output:
Strictly return in JSON format:
{{
  "queries": ["query1", "query2"]
}}

### Chat History:
<chat_history>
{messages_text(messages[-6:])}
</chat_history>
"""


def autocomplete_prompt(prompt: str = "Summarise the quarterly", kind: str = "General",
                        messages: list[dict[str, Any]] = CHAT) -> str:
    return f"""### Task:
You complete text: continue the text in `<text>` as the completion type in `<type>` asks, in its language.

### **Instructions**:
1. Read `<text>` and `<type>` (**General** or **Search Query**).
2. Continue `<text>` directly, without repeating it.
3. If unsure, return: `{{ "text": "" }}`.

### **Output Rules**:
- Respond only in JSON format: `{{ "text": "<your_completion>" }}`.

---
### Context:
<chat_history>
{messages_text(messages[-6:])}
</chat_history>
<type>{kind}</type>
<text>{prompt}</text>
#### Output:
"""


def emoji_prompt(message: str = "That is great news!") -> str:
    return ("Your task is to reflect the speaker's likely facial expression through a fitting emoji. Pick one that "
            f"matches the feeling of the message.\n\nMessage: ```{message}```")


def task_body(content: str, **extra: Any) -> dict[str, Any]:
    """The chat completion request Open WebUI sends for a task (its own bookkeeping fields left out)."""
    return {"model": TASK_MODEL, "messages": [{"role": "user", "content": content}], "stream": False, **extra}


# name -> (filled template, the JSON key Open WebUI reads from the answer; None: the emoji, plain text)
TASKS: dict[str, tuple[str, str | None]] = {
    "title": (title_prompt(), "title"),
    "tags": (tags_prompt(), "tags"),
    "follow-ups": (follow_ups_prompt(), "follow_ups"),
    "queries": (queries_prompt(), "queries"),
    "autocomplete": (autocomplete_prompt(), "text"),
    "emoji": (emoji_prompt(), None),
}


def parsed_answer(content: str, key: str | None) -> Any:
    """What Open WebUI takes from a task's answer: the JSON object between the first "{" and the last "}" (the
    queries task: the last "{"), its `key`; the emoji answer as it is."""
    import json

    if key is None:
        return content.strip()
    start = content.rfind("{") if key == "queries" else content.find("{")
    value = json.loads(content[start:content.rfind("}") + 1])
    return value[key]
