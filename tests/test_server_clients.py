"""The server with the exact requests real clients send: Open WebUI 0.12.4's message shapes and the official
`openai` client's types, asserting the prompt ids the model receives (a recording stand-in backend)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from common.documents.images import load_image
from common.engine.engine import Engine
from common.engine.sampling import SamplingParams
from common.model.families import resolve_mode
from common.model.inputs import PreparedInputs
from common.serve.chat import DEFAULT_IMAGE_INSTRUCTION
from server import ServerSettings, create_app
from tests import fakes
from tests.conftest import FIXTURES, MODEL_DIR, fixture_tokenizer
from tests.helpers import LiveServer

pytestmark = pytest.mark.server

DOC_IMAGE = FIXTURES / "images" / "doc_text.png"
MODE = "tiny"
IMAGE_URL = "data:image/png;base64," + base64.b64encode(DOC_IMAGE.read_bytes()).decode()
MANIFEST = ('<attached_files>\n<file type="file" id="0b7e2c1a-5d0e-4c55-9a43-2f6f0f1c9e11" '
            'content_type="image/png" name="scan.png"/>\n</attached_files>\n\n')
REPLY = "# Quarterly report"


class Recorded:
    """What the engine core was given: each request's prompt ids and sampling parameters, as submitted."""

    def __init__(self, engine: Engine) -> None:
        self.seen: list[tuple[list[int], SamplingParams]] = []
        core = engine.core
        assert core is not None
        submit = core.submit

        def recording_submit(prepared: PreparedInputs, params: SamplingParams, **kwargs: Any) -> Any:
            self.seen.append((prepared.input_ids.tolist(), params))
            return submit(prepared, params, **kwargs)

        core.submit = recording_submit  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[LiveServer, Engine, Recorded]]:
    engine = fakes.fixture_engine(fakes.RecordingBackend(fixture_tokenizer(), REPLY))
    recorded = Recorded(engine)
    # --model-tasks: Open WebUI's title task reaches the model here (tests/test_server_tasks.py: answered at once)
    with LiveServer(create_app(engine, ServerSettings(mode=MODE, model_tasks=True))) as server:
        yield server, engine, recorded


def expected_ids(engine: Engine, prompt: str, images: int = 1) -> list[int]:
    image = load_image(DOC_IMAGE)
    return engine.prepare(prompt, [image] * images, resolve_mode(MODE)).input_ids.tolist()


def owui_body(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Open WebUI 0.12.4's chat request: streamed, with its own bookkeeping fields (ignored by the server)."""
    return {"stream": True, "model": "deepseek-ocr", "messages": messages,
            "stream_options": {"include_usage": True}, **extra}


def image_turn(text: str | None) -> dict[str, Any]:
    """An uploaded image as Open WebUI sends it: the file manifest text part (+ the user's text), then the image."""
    return {"role": "user", "content": [{"type": "text", "text": MANIFEST + (text or "")},
                                        {"type": "image_url", "image_url": {"url": IMAGE_URL}}]}


def send(server: LiveServer, backend: Recorded, body: dict[str, Any]) -> tuple[str, list[int], Any]:
    before = len(backend.seen)
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    import json

    chunks = [json.loads(line[6:]) for line in lines]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(backend.seen) == before + 1
    ids, params = backend.seen[-1]
    return text, ids, params


def test_owui_image_only_gets_the_markdown_task(served) -> None:
    server, engine, backend = served
    _, ids, _ = send(server, backend, owui_body([image_turn(None)]))
    assert ids == expected_ids(engine, "<image>\n" + DEFAULT_IMAGE_INSTRUCTION)


def test_owui_manifest_instruction_image_equals_plain_openai_shape(served) -> None:
    server, engine, backend = served
    _, owui_ids, _ = send(server, backend, owui_body([image_turn("Free OCR.")]))
    split = {"role": "user", "content": [{"type": "text", "text": MANIFEST}, {"type": "text", "text": "Free OCR."},
                                         {"type": "image_url", "image_url": {"url": IMAGE_URL}}]}
    _, split_ids, _ = send(server, backend, owui_body([split]))
    plain = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}},
                                         {"type": "text", "text": "Free OCR."}]}
    _, plain_ids, _ = send(server, backend, owui_body([plain]))
    assert owui_ids == split_ids == plain_ids == expected_ids(engine, "<image>\nFree OCR.")


def test_owui_follow_up_question_reuses_the_image(served) -> None:
    server, engine, backend = served
    messages = [image_turn("Free OCR."), {"role": "assistant", "content": REPLY},
                {"role": "user", "content": "What is the title?"}]
    _, ids, params = send(server, backend, owui_body(messages))
    assert ids == expected_ids(engine, "<image>\nWhat is the title?")
    assert params.max_new_tokens is None  # as many as fit: an image request is not capped like text-only ones
    assert params.default_max_new_tokens > ServerSettings().limits.max_text_tokens


def test_owui_continue_response_returns_only_the_continuation(served) -> None:
    server, engine, backend = served
    messages = [image_turn("Free OCR."), {"role": "assistant", "content": "Revenue grew"}]
    text, ids, _ = send(server, backend, owui_body(messages))
    assert ids == expected_ids(engine, "<image>\nFree OCR.Revenue grew")
    assert text == REPLY  # what the model generated after the given start, not the start again


def test_owui_title_task_is_text_only_and_capped(served) -> None:
    server, engine, backend = served
    task = ("### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
            "### Output:\nJSON format: { \"title\": \"your concise title here\" }\n### Chat History:\n"
            "<chat_history>\nUSER: Free OCR.\nASSISTANT: # Quarterly report\n</chat_history>")
    for extra in ({"max_tokens": 1000}, {}):
        body = {"model": "deepseek-ocr", "messages": [{"role": "user", "content": task}], "stream": False, **extra}
        response = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        ids, params = backend.seen[-1]
        assert ids == engine.prepare(task, [], resolve_mode(MODE)).input_ids.tolist()
        assert (params.max_new_tokens or params.default_max_new_tokens) == ServerSettings().limits.max_text_tokens


def test_openai_client_types_validate_strictly(served) -> None:
    server, _, _ = served
    from openai.types.chat import ChatCompletion
    from openai.types.responses import Response

    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
    raw = client.responses.with_raw_response.create(model="deepseek-ocr", input="Say hi.", max_output_tokens=4)
    Response.model_validate(raw.http_response.json(), strict=True)
    raw = client.chat.completions.with_raw_response.create(model="deepseek-ocr", max_tokens=4,
                                                            messages=[{"role": "user", "content": "Say hi."}])
    ChatCompletion.model_validate(raw.http_response.json(), strict=True)


def test_windowed_ngram_rule_whitelists_table_cells(served) -> None:
    server, engine, backend = served
    body = {"messages": [{"role": "user", "content": "table"}], "max_tokens": 4, "no_repeat_ngram_size": 30,
            "ngram_window": 90}
    assert httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60).status_code == 200
    _, params = backend.seen[-1]
    td = [engine.tokenizer.token_to_id("<td>"), engine.tokenizer.token_to_id("</td>")]
    assert list(params.ngram_whitelist) == td and None not in td
    body.pop("ngram_window")
    httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)
    assert backend.seen[-1][1].ngram_whitelist == ()  # the Hugging Face rule has no whitelist


def test_health_and_metrics_shapes(served) -> None:
    server, _, _ = served
    health = httpx.get(f"{server.base}/health", timeout=10).json()
    assert str(MODEL_DIR) not in str(health) and health["model"]["name"] == MODEL_DIR.name
    metrics = httpx.get(f"{server.base}/metrics", timeout=10)
    assert metrics.headers["content-type"].count("charset") == 1
    assert "dsocr_resident_memory_bytes" in metrics.text


def test_max_tokens_must_fit_the_lane_not_only_the_model_context() -> None:
    """--max-context 64: a request whose prompt plus max_tokens fits the model's 8k context but not the lane is
    refused, naming max_tokens (it used to be accepted and silently shortened to the lane)."""
    tokenizer = fixture_tokenizer()
    engine = fakes.fixture_engine(fakes.ScriptedBackend(tokenizer.encode(REPLY), tokenizer.eos_id, lane_capacity=64))
    with LiveServer(create_app(engine, ServerSettings(mode=MODE))) as server:
        prompt_tokens = len(engine.prepare("Hello there.", [], resolve_mode(MODE)).input_ids)
        room = 64 - prompt_tokens

        def ask(max_tokens: int) -> httpx.Response:
            body = {"model": "deepseek-ocr", "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": "Hello there."}]}
            return httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)

        refused = ask(room + 1)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "max_tokens" and f"ask for at most {room}" in error["message"]
        assert "--max-context" in error["message"]
        fits = ask(room)
        assert fits.status_code == 200 and fits.json()["choices"][0]["message"]["content"] == REPLY
