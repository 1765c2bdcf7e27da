"""A bad-input corpus against the live server: every case gets its status and a message (never a 5xx), and the
server answers normally afterwards. Also: PDFs rendered concurrently (pdfium is not thread-safe)."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator

import httpx
import pytest

from server import ServerSettings, create_app
from tests.conftest import fixture_tokenizer
from tests.fakes import RecordingBackend, fixture_engine
from tests.helpers import LiveServer
from tests.hostile import corpus, file_chat, pdf_bytes, text_chat

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    tokenizer = fixture_tokenizer()
    engine = fixture_engine(RecordingBackend(tokenizer))
    settings = ServerSettings(mode="tiny", prepare_workers=4, fetch=ServerSettings().fetch)
    with LiveServer(create_app(engine, settings)) as live:
        yield live


def post(server: LiveServer, body: object = None, raw: bytes | None = None) -> httpx.Response:
    url = f"{server.base}/v1/chat/completions"
    if raw is not None:
        return httpx.post(url, content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    return httpx.post(url, json=body, timeout=60)


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.name)
def test_bad_input_corpus(server: LiveServer, case) -> None:
    response = post(server, case.body, case.raw)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert case.needle in error["message"].lower(), error
    assert "traceback" not in response.text.lower()
    if case.param != "-":
        assert error["param"] == case.param, error


@pytest.mark.slow
def test_server_is_healthy_after_the_corpus(server: LiveServer) -> None:
    for case in corpus():
        assert post(server, case.body, case.raw).status_code < 500
    assert httpx.get(f"{server.base}/health", timeout=10).json()["status"] == "ready"
    ok = post(server, text_chat("hello"))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    metrics = httpx.get(f"{server.base}/metrics", timeout=10).text
    assert 'status="500"' not in metrics and "dsocr_generations_failed_total 0" in metrics


def test_pdfs_render_concurrently(server: LiveServer) -> None:
    """Many multi-page PDFs prepared at once on several threads: pdfium calls must be serialised."""
    pdfs = [pdf_bytes([(300 + 10 * i, 400)] * 4) for i in range(6)]

    def ask(pdf: bytes) -> int:
        response = post(server, file_chat(pdf))
        return response.status_code if response.status_code != 200 else json.loads(response.text)["usage"][
            "prompt_tokens"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(ask, pdfs * 4))
    assert all(r > 100 for r in results), results  # every request answered with its 4 pages' tokens
    assert httpx.get(f"{server.base}/health", timeout=10).json()["status"] == "ready"
