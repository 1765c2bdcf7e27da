"""The OpenAI-compatible server, end to end: a live uvicorn server on loopback driven by the `openai` client.

The main server runs the tiny fixture model (torch, CPU, float32); its outputs are compared with the Engine run
directly on the same inputs. A second server runs a slow stand-in backend to make queueing, keep-alives and
cancellation timing deterministic.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from common.documents.images import load_image
from common.documents.postprocess import strip_grounding
from common.engine.engine import Engine
from common.engine.sampling import SamplingParams
from common.errors import ImageError
from common.model.families import resolve_mode
from common.serve.fetch import RemoteFetchError, fetch_url
from server import ServerSettings, create_app
from tests import fakes
from tests.conftest import FIXTURES, FIXTURES_V2, MODEL_DIR, MODEL_DIR_V2, case_by_id_v2, fixture_tokenizer
from tests.fakes import SlowBackend
from tests.helpers import LiveServer, data_url

pytestmark = pytest.mark.server

API_KEY = "test-key-123"
DOC_IMAGE = FIXTURES / "images" / "doc_text.png"
MODE = "tiny"  # smallest views: keeps the vision prefill of the fixture model quick
MAX_TOKENS = 12


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(str(MODEL_DIR), backend="torch", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def live(engine: Engine) -> Iterator[LiveServer]:
    settings = ServerSettings(mode=MODE, max_queue=16, max_body_mb=1.0, api_key=API_KEY, max_new_tokens=16,
                              keepalive_s=1.0)
    with LiveServer(create_app(engine, settings)) as server:
        yield server


@pytest.fixture(scope="module")
def slow() -> Iterator[tuple[LiveServer, SlowBackend]]:
    tokenizer = fixture_tokenizer()
    backend = SlowBackend(tokenizer.eos_id, prefill_s=0.6, step_s=0.02)
    fake = fakes.fixture_engine(backend, max_batch=1)  # queueing is what runs here
    settings = ServerSettings(mode=MODE, max_queue=1, max_new_tokens=400, keepalive_s=0.1)
    with LiveServer(create_app(fake, settings)) as server:
        yield server, backend


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Any:
    return openai.OpenAI(base_url=f"{live.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def engine_text(engine: Engine, prompt: str, images: list[Image.Image], max_tokens: int) -> tuple[str, Any]:
    prepared = engine.prepare(prompt, images, resolve_mode(MODE))
    result = engine.generate(prepared, SamplingParams(max_new_tokens=max_tokens))
    return strip_grounding(result.text), result


def image_message(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(DOC_IMAGE)}},
        {"type": "text", "text": text},
    ]}]


# ---------------------------------------------------------------------------------------------- OpenAI client


def test_models_list(client: Any, live: LiveServer) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["deepseek-ocr"]
    assert client.models.retrieve("deepseek-ocr").id == "deepseek-ocr"
    assert client.models.retrieve(MODEL_DIR.name).id == "deepseek-ocr"  # the model directory name is accepted
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_stream_equals_nonstream_equals_engine(client: Any, engine: Engine) -> None:
    expected, result = engine_text(engine, "<image>\nFree OCR.", [load_image(DOC_IMAGE)], MAX_TOKENS)
    completion = client.chat.completions.create(model="deepseek-ocr", messages=image_message("Free OCR."),
                                                max_tokens=MAX_TOKENS)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == result.finish_reason
    assert completion.usage.prompt_tokens == result.prompt_tokens
    assert completion.usage.completion_tokens == result.completion_tokens

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(model="deepseek-ocr", messages=image_message("Free OCR."),
                                            max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected
    assert finish == result.finish_reason
    assert usage is not None and usage.completion_tokens == result.completion_tokens
    assert usage.total_tokens == result.prompt_tokens + result.completion_tokens


def test_responses_api(client: Any, engine: Engine) -> None:
    expected, result = engine_text(engine, "<image>\nFree OCR.", [load_image(DOC_IMAGE)], MAX_TOKENS)
    items = [{"role": "user", "content": [
        {"type": "input_image", "image_url": data_url(DOC_IMAGE)},
        {"type": "input_text", "text": "Free OCR."},
    ]}]
    response = client.responses.create(model="deepseek-ocr", input=items, max_output_tokens=MAX_TOKENS)
    assert response.output_text == expected
    assert response.usage.input_tokens == result.prompt_tokens
    assert response.usage.output_tokens == result.completion_tokens

    deltas, kinds, final = [], [], None
    for event in client.responses.create(model="deepseek-ocr", input=items, max_output_tokens=MAX_TOKENS,
                                         stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[0] == "response.created"
    assert "".join(deltas) == expected
    assert final is not None and final.usage.output_tokens == result.completion_tokens


def test_text_only_request(client: Any, engine: Engine) -> None:
    expected, result = engine_text(engine, "Write a title for this chat.", [], 8)
    completion = client.chat.completions.create(
        model="deepseek-ocr", max_tokens=8,
        messages=[{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": "Write a title for this chat."}])
    assert completion.choices[0].message.content == expected
    assert completion.usage.prompt_tokens == result.prompt_tokens
    response = client.responses.create(model="deepseek-ocr", input="Write a title for this chat.",
                                       max_output_tokens=8)
    assert response.output_text == expected


def test_pdf_file_part(client: Any, engine: Engine) -> None:
    pages = [load_image(DOC_IMAGE), Image.new("RGB", (300, 200), "white")]
    buffer = io.BytesIO()
    pages[0].save(buffer, "PDF", save_all=True, append_images=pages[1:], resolution=144)
    pdf_url = "data:application/pdf;base64," + base64.b64encode(buffer.getvalue()).decode()
    completion = client.chat.completions.create(model="deepseek-ocr", max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "file", "file": {"file_data": pdf_url, "filename": "scan.pdf"}},
                                     {"type": "text", "text": "Free OCR."}]}])
    # Each page is one image: the prompt holds two image runs.
    single = engine.prepare("<image>\nFree OCR.", [pages[1]], resolve_mode(MODE))
    assert completion.usage.prompt_tokens > single.prompt_tokens + single.image_tokens
    assert completion.usage.completion_tokens == 4


@pytest.mark.slow
def test_concurrent_clients_match_sequential(client: Any) -> None:
    prompts = [f"Free OCR. {i}" for i in range(8)]

    def ask(prompt: str) -> str:
        completion = client.chat.completions.create(model="deepseek-ocr", messages=image_message(prompt),
                                                    max_tokens=6)
        return completion.choices[0].message.content

    sequential = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        concurrent_results = list(pool.map(ask, prompts))
    assert concurrent_results == sequential


def batch_histogram(server: LiveServer) -> dict[float, float]:
    """Cumulative decode steps by batch-size bucket bound (inf for +Inf)."""
    text = httpx.get(f"{server.base}/metrics", timeout=5).text
    return {float(m.group(1)): float(m.group(2)) for m in re.finditer(
        r'^dsocr_batch_size_bucket\{le="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


def test_concurrent_requests_decode_together_and_stream_what_they_get_alone(live: LiveServer) -> None:
    """Five streamed requests at once share decode steps; each one's text equals the same request alone."""
    bodies = [{"model": "deepseek-ocr", "stream": True, "max_tokens": 8 + 2 * i,
               "messages": image_message(f"Free OCR. Part {i}.")} for i in range(5)]

    def stream(body: dict[str, Any]) -> str:
        text = []
        with httpx.Client(base_url=live.base, timeout=120, headers=auth()) as http, \
                http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"]
                    if delta and delta[0]["delta"].get("content"):
                        text.append(delta[0]["delta"]["content"])
        return "".join(text)

    before = batch_histogram(live)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        together = list(pool.map(stream, bodies))
    after = batch_histogram(live)
    single_steps = after[1.0] - before.get(1.0, 0)
    all_steps = after[float("inf")] - before.get(float("inf"), 0)
    assert all_steps > single_steps, "no decode step held more than one sequence"
    alone = [stream(body) for body in bodies]
    assert together == alone and all(alone)


def test_cancel_frees_the_lane_within_a_step() -> None:
    """Two long streams decode together; the first client leaves: its sequence is gone from the next step."""
    tokenizer = fixture_tokenizer()
    backend = SlowBackend(tokenizer.eos_id, prefill_s=0.05, step_s=0.02)
    fake = fakes.fixture_engine(backend)
    body = {"messages": [{"role": "user", "content": "a long page"}], "max_tokens": 2000, "stream": True}
    with LiveServer(create_app(fake, ServerSettings(mode=MODE, keepalive_s=0.1))) as server, \
            httpx.Client(base_url=server.base, timeout=30) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as second:
        second_lines = second.iter_lines()
        with http.stream("POST", "/v1/chat/completions", json={**body, "messages": [
                {"role": "user", "content": "another page"}]}) as first:
            first_lines = first.iter_lines()
            for _ in range(3):
                next(first_lines)
                next(second_lines)
            server.wait_for_metric("dsocr_running_sequences", 2)
            assert max(backend.batch_sizes) == 2
        # the first client is gone: its sequence leaves the batch at the next step
        server.wait_for_metric("dsocr_generations_cancelled_total", 1)
        steps_at_cancel = len(backend.batch_sizes)
        for _ in range(5):
            next(second_lines)
        assert server.metric("dsocr_running_sequences") == 1
        later = backend.batch_sizes[steps_at_cancel:]
        assert later and set(later) == {1}


# ---------------------------------------------------------------------------------------------- errors


def post_chat(live: LiveServer, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
              ) -> httpx.Response:
    headers = {**auth(), **(headers or {})}
    if raw is not None:
        return httpx.post(f"{live.base}/v1/chat/completions", content=raw,
                          headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(f"{live.base}/v1/chat/completions", json=body, headers=headers, timeout=60)


def assert_openai_error(response: httpx.Response, status: int, needle: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle.lower() in error["message"].lower()
    return error


def chat_with_url(url: str) -> dict[str, Any]:
    return {"model": "deepseek-ocr", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


def test_auth_required(live: LiveServer) -> None:
    body = {"model": "deepseek-ocr", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    no_key = httpx.post(f"{live.base}/v1/chat/completions", json=body, timeout=10)
    assert_openai_error(no_key, 401, "api key")
    wrong = post_chat(live, body, headers={"Authorization": "Bearer nope"})
    assert_openai_error(wrong, 401)
    assert httpx.get(f"{live.base}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{live.base}/health", timeout=10).json()["status"] == "ready"


def test_body_too_large(live: LiveServer) -> None:
    blob = base64.b64encode(np.random.default_rng(0).bytes(1_200_000)).decode()
    response = post_chat(live, chat_with_url("data:image/png;base64," + blob))
    assert_openai_error(response, 413)


def test_bad_inputs(live: LiveServer) -> None:
    assert_openai_error(post_chat(live, chat_with_url("data:image/png;base64,@@not base64!!")), 400, "base64")
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50).decode()
    assert_openai_error(post_chat(live, chat_with_url(corrupt)), 400, "image")
    assert_openai_error(post_chat(live, chat_with_url("ftp://example.com/a.png")), 400)
    assert_openai_error(post_chat(live, None, raw=b"{not json"), 400)
    assert post_chat(live, {"model": "deepseek-ocr"}).status_code in (400, 422)  # messages missing
    assert post_chat(live, {"messages": [], "max_tokens": "many"}).status_code in (400, 422)
    assert_openai_error(post_chat(live, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}), 404)
    assert_openai_error(post_chat(live, {"messages": [{"role": "system", "content": "x"}]}), 400, "user")
    assert_openai_error(post_chat(live, {"messages": [{"role": "user", "content": "x"}], "mode": "huge"}), 400)
    # the worker survived all of that
    ok = post_chat(live, {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_ssrf_refused(live: LiveServer) -> None:
    for url in ("http://127.0.0.1:1/secret.png", "http://169.254.169.254/latest/meta-data/",
                "http://[::1]/x.png", "http://localhost/x.png", "http://10.0.0.1/x.png"):
        assert_openai_error(post_chat(live, chat_with_url(url)), 400, "non-public")


def test_fetch_url_limits_and_private_opt_in() -> None:
    png = DOC_IMAGE.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/doc.png")
                self.end_headers()
                return
            body, kind = (png, "image/png") if self.path == "/doc.png" else (b"<html>", "text/html")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(RemoteFetchError, match="non-public"):
            fetch_url(f"{base}/doc.png")
        fetched = fetch_url(f"{base}/redirect", allow_private=True)
        assert fetched.data == png and fetched.url.endswith("/doc.png")
        with pytest.raises(RemoteFetchError, match="not an image"):
            fetch_url(f"{base}/page.html", allow_private=True)
        with pytest.raises(ImageError, match="limit"):
            fetch_url(f"{base}/doc.png", allow_private=True, max_bytes=1000)
        with pytest.raises(RemoteFetchError, match="redirects"):
            fetch_url(f"{base}/redirect", allow_private=True, max_redirects=0)
    finally:
        httpd.shutdown()


# ---------------------------------------------------------------------------------------------- slow backend


@pytest.mark.slow
def test_queue_full_gives_429(slow: tuple[LiveServer, SlowBackend]) -> None:
    server, _ = slow
    body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 400, "stream": True}  # ~8 s
    with (
        httpx.Client(base_url=server.base, timeout=30) as http_client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        with http_client.stream("POST", "/v1/chat/completions", json=body) as running:
            lines = running.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)
            server.wait_for_metric("dsocr_requests_running", 1)  # the first request is being generated
            queued = pool.submit(
                httpx.post,
                f"{server.base}/v1/chat/completions",
                json={**body, "stream": False, "max_tokens": 2},
                timeout=30,
            )
            server.wait_for_metric("dsocr_queue_depth", 1)  # the second one waits
            refused = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=30)
            error = assert_openai_error(refused, 429, "busy")
            assert error["type"] == "rate_limit_error"
            assert int(refused.headers["Retry-After"]) >= 1
        # leaving the stream cancels the first request; the queued one is then served
        queued_response = queued.result()
        assert queued_response.status_code == 200
        assert queued_response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.slow
def test_keepalive_and_disconnect_cancels(slow: tuple[LiveServer, SlowBackend]) -> None:
    server, backend = slow
    body = {"messages": [{"role": "user", "content": "a long page"}], "max_tokens": 400, "stream": True}
    cancelled_before = server.metric("dsocr_generations_cancelled_total")
    steps_before = backend.steps
    lines = []
    with httpx.Client(base_url=server.base, timeout=30) as http_client, \
            http_client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if sum(line.startswith("data: {") for line in lines) >= 4:  # role chunk + 3 content chunks
                break
    assert ": keep-alive" in lines  # sent during the 0.6 s prefill
    deadline = time.monotonic() + 10
    while server.metric("dsocr_generations_cancelled_total") == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("dsocr_generations_cancelled_total") == cancelled_before + 1
    assert 0 < backend.steps - steps_before < 100  # stopped long before 400 tokens
    steps_before = backend.steps
    # a non-streamed request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/chat/completions", json={**body, "stream": False}, timeout=1.5)
    server.wait_for_metric("dsocr_generations_cancelled_total", cancelled_before + 2)
    assert backend.steps - steps_before < 200
    follow_up = httpx.post(f"{server.base}/v1/chat/completions", timeout=30,
                           json={"messages": [{"role": "user", "content": "next"}], "max_tokens": 3})
    assert follow_up.status_code == 200
    assert follow_up.json()["choices"][0]["finish_reason"] == "length"


def test_metrics_and_openapi(live: LiveServer) -> None:
    text = httpx.get(f"{live.base}/metrics", timeout=10).text
    for name in ("dsocr_requests_total", "dsocr_generated_tokens_total", "dsocr_queue_depth",
                 "dsocr_time_to_first_token_seconds_bucket"):
        assert name in text
    schema = httpx.get(f"{live.base}/schema/openapi.json", timeout=10).json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/responses" in schema["paths"]


@pytest.mark.slow
def test_schema_fuzz_no_server_errors(live: LiveServer) -> None:
    import schemathesis  # a dev dependency (imported here: it is slow to import)
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{live.base}/schema/openapi.json")
    statuses: list[int] = []
    for path in ("/v1/chat/completions", "/v1/responses"):
        strategy = schema[path]["POST"].as_strategy()

        @settings(max_examples=8, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case: Any) -> None:
            response = case.call(base_url=live.base, headers=auth(), timeout=60)
            statuses.append(response.status_code)
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                assert "error" in json.loads(response.text)

        check()
    assert len(statuses) >= 12


def test_grounding_markup_stripped_for_chat_unless_kept() -> None:
    import json as _json

    golden = _json.loads((FIXTURES / "postprocess_goldens.json").read_text())["cases"][0]
    fake = fakes.fixture_engine(fakes.ScriptedBackend(golden["generated_ids"], 1))
    with LiveServer(create_app(fake, ServerSettings(mode=MODE, max_new_tokens=400))) as server:
        body = {"messages": [{"role": "user", "content": "page"}]}
        plain = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=30).json()
        kept = httpx.post(f"{server.base}/v1/chat/completions", json={**body, "grounding": "keep"}, timeout=30).json()
        with httpx.stream("POST", f"{server.base}/v1/chat/completions", json={**body, "stream": True},
                          timeout=30) as response:
            pieces = [
                _json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                for line in response.iter_lines()
                if line.startswith("data: {") and _json.loads(line[6:])["choices"]
            ]
    assert "<|ref|>" in golden["model_text"]
    assert kept["choices"][0]["message"]["content"] == golden["model_text"]
    assert plain["choices"][0]["message"]["content"] == strip_grounding(golden["model_text"])
    assert "".join(pieces) == strip_grounding(golden["model_text"])


def test_server_uses_the_models_presets() -> None:
    """A DeepSeek-OCR 2 model: requests resolve modes with its family (default gundam, 768 px tiles; 'tiny'
    refused); the prompt of the official case with the same image and prompt has the same length."""
    from litestar.testing import TestClient

    case = case_by_id_v2("pm06_small_default")  # images/small.png, "<image>\nFree OCR.", the default setting
    assert case["prompt"] == "<image>\nFree OCR." and case["mode"] == "default"
    engine = Engine.load(str(MODEL_DIR_V2), backend="torch", device="cpu", dtype="float32")
    content = [{"type": "image_url", "image_url": {"url": data_url(FIXTURES_V2 / case["image"])}},
               {"type": "text", "text": "Free OCR."}]
    body: dict[str, Any] = {"model": "deepseek-ocr", "max_tokens": 4}
    body["messages"] = [{"role": "user", "content": content}]
    try:
        with TestClient(create_app(engine, ServerSettings())) as client:
            ok = client.post("/v1/chat/completions", json=body)
            assert ok.status_code == 200, ok.text
            assert ok.json()["usage"]["prompt_tokens"] == case["input_len"]  # BOS, the image tokens, "\nFree OCR."
            bad = client.post("/v1/chat/completions", json={**body, "mode": "tiny"})
            assert bad.status_code == 400 and "DeepSeek-OCR 2" in bad.json()["error"]["message"]
            assert client.get("/health").json()["model"]["family"] == "deepseek-ocr-2"
    finally:
        engine.close()
