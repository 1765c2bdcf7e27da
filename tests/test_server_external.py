"""Open WebUI's External content extraction engine (`PUT /process`) through the live server, with the exact request
Open WebUI 0.12.4 sends (open_webui/retrieval/loaders/external_document.py: `requests.put`, no timeout, the raw
file as the body, its MIME type, the key, X-Filename and the user headers) and its reading of the answer.

A scripted stand-in model answers every page with grounded Markdown (a title, a figure, a paragraph), so page
counts, metadata and figures are exact and quick; one slow test runs the tiny real model on a PDF.
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from PIL import Image

from common.engine.engine import Engine
from server import ServerSettings, create_app
from tests import fakes
from tests.conftest import FIXTURES, MODEL_DIR, fixture_tokenizer
from tests.helpers import LiveServer, make_pdf, page_image

pytestmark = pytest.mark.server

KEY = "sk-owui-external"
DOC_IMAGE = FIXTURES / "images" / "doc_text.png"
GROUNDED = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 150]]<|/det|>\n# Quarterly report\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 200, 600, 700]]<|/det|>\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 750, 900, 950]]<|/det|>\nRevenue grew."
)
MARKDOWN_TEXT = "# Quarterly report"
MAX_DOCUMENT_PAGES = 4


class User:
    """The user Open WebUI forwards (include_user_info_headers)."""

    id, name, email, role = "7c9e6679-7425-40de-944b-e07fc1f90ae7", "Ana Lívia", "ana@example.com", "user"


def owui_load(base: str, path: Path, mime_type: str | None, api_key: str | None = KEY,
              extra_headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """ExternalDocumentLoader.load() of Open WebUI 0.12.4, step by step: the file's bytes PUT to {url}/process with
    `requests` and no timeout; the answer read as one or a list of Documents (page_content, metadata), both
    required; any other status raised as "Error loading document: {status} {text}"."""
    data = path.read_bytes()
    headers: dict[str, str] = {}
    if mime_type is not None:
        headers["Content-Type"] = mime_type
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    headers["X-Filename"] = quote(path.name)
    headers.update(extra_headers or {})
    headers.update({"X-OpenWebUI-User-Name": quote(User.name, safe=" "), "X-OpenWebUI-User-Id": User.id,
                    "X-OpenWebUI-User-Email": User.email, "X-OpenWebUI-User-Role": User.role})
    response = requests.put(f"{base.rstrip('/')}/process", data=data, headers=headers)
    if not response.ok:
        raise LoadError(response.status_code, response.text)
    answer = response.json()
    if not answer:
        raise AssertionError("Error loading document: No content returned")
    items = [answer] if isinstance(answer, dict) else answer
    assert isinstance(items, list)
    for item in items:  # langchain's Document(page_content: str, metadata: dict) validates both
        assert isinstance(item.get("page_content"), str), item
        assert isinstance(item.get("metadata"), dict), item
    return items


class LoadError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"Error loading document: {status} {text}")
        self.status, self.text = status, text

    @property
    def error(self) -> dict[str, Any]:
        return json.loads(self.text)["error"]


def stored(tmp_path: Path, name: str, data: bytes) -> Path:
    """The file as Open WebUI keeps it in its uploads folder: "{file id}_{original name}"."""
    path = tmp_path / f"{uuid.uuid4()}_{name}"
    path.write_bytes(data)
    return path


def pdf_bytes(tmp_path: Path, pages: int) -> bytes:
    return make_pdf(tmp_path / f"scan{pages}.pdf", pages).read_bytes()


def tiff_bytes(pages: int) -> bytes:
    images = [page_image(f"Page {i + 1}") for i in range(pages)]
    buffer = io.BytesIO()
    images[0].save(buffer, "TIFF", save_all=True, append_images=images[1:], compression="tiff_deflate")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def scripted() -> Engine:
    return fakes.script_engine(GROUNDED)


@pytest.fixture(scope="module")
def live(scripted: Engine) -> Iterator[LiveServer]:
    settings = ServerSettings(mode="tiny", api_key=KEY, max_document_pages=MAX_DOCUMENT_PAGES, max_body_mb=1.0)
    with LiveServer(create_app(scripted, settings)) as server:
        yield server


# ---------------------------------------------------------------------------------------------- documents


def test_a_scanned_pdf_gives_one_item_per_page(live: LiveServer, tmp_path: Path) -> None:
    path = stored(tmp_path, "Quarterly report 2025.pdf", pdf_bytes(tmp_path, 2))
    items = owui_load(live.base, path, "application/pdf")
    assert len(items) == 2
    for number, item in enumerate(items):
        metadata = item["metadata"]
        assert metadata["page"] == number and metadata["page_label"] == str(number + 1)
        assert metadata["total_pages"] == 2
        assert metadata["file_name"] == "Quarterly report 2025.pdf"  # the file id prefix removed
        assert metadata["content_type"] == "application/pdf"
        assert metadata["model"] == "deepseek-ocr" and metadata["mode"] == "tiny"
        assert metadata["finish_reason"] == "stop"
        assert None not in metadata.values()  # vector stores refuse null metadata
        text = item["page_content"]
        assert text.startswith(MARKDOWN_TEXT) and "Revenue grew." in text
        assert "<|ref|>" not in text and "<|det|>" not in text  # grounding turned into Markdown
    # Figures are numbered across the document, referenced the way the Mistral OCR API does it
    assert "![img-0.jpeg](img-0.jpeg)" in items[0]["page_content"]
    assert "![img-1.jpeg](img-1.jpeg)" in items[1]["page_content"]


def test_an_image_body_is_one_page(live: LiveServer, tmp_path: Path) -> None:
    path = stored(tmp_path, "photo of a receipt.png", DOC_IMAGE.read_bytes())
    [item] = owui_load(live.base, path, "image/png")
    assert item["metadata"]["page"] == 0 and item["metadata"]["total_pages"] == 1
    assert item["metadata"]["file_name"] == "photo of a receipt.png"
    assert item["page_content"].startswith(MARKDOWN_TEXT)


def test_a_multi_page_tiff_gives_its_pages(live: LiveServer, tmp_path: Path) -> None:
    path = stored(tmp_path, "fax.tiff", tiff_bytes(3))
    items = owui_load(live.base, path, "image/tiff")
    assert [item["metadata"]["page_label"] for item in items] == ["1", "2", "3"]


def test_the_type_is_read_from_the_bytes_not_the_header(live: LiveServer, tmp_path: Path) -> None:
    """Open WebUI sends the stored MIME type, which may be missing or generic."""
    path = stored(tmp_path, "scan", pdf_bytes(tmp_path, 1))
    for mime_type in (None, "application/octet-stream"):
        [item] = owui_load(live.base, path, mime_type)
        assert item["page_content"].startswith(MARKDOWN_TEXT)


def test_a_text_file_comes_back_as_it_is(live: LiveServer, tmp_path: Path) -> None:
    """Open WebUI sends every file to the External engine, text files too."""
    text = "name,total\nAna,12\nJosé,7\n"
    path = stored(tmp_path, "totals.csv", text.encode())
    [item] = owui_load(live.base, path, "text/csv")
    assert item["page_content"] == text
    assert item["metadata"]["file_name"] == "totals.csv" and item["metadata"]["total_pages"] == 1


def test_figures_can_be_embedded_or_dropped(live: LiveServer, tmp_path: Path) -> None:
    path = stored(tmp_path, "one.pdf", pdf_bytes(tmp_path, 1))
    [embedded] = owui_load(live.base, path, "application/pdf", extra_headers={"X-Dsocr-Figures": "embed"})
    prefix = "![img-0.jpeg](data:image/jpeg;base64,"
    assert prefix in embedded["page_content"]
    encoded = embedded["page_content"].split(prefix, 1)[1].split(")", 1)[0]
    figure = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert figure.format == "JPEG" and figure.width > 1 and figure.height > 1
    [dropped] = owui_load(live.base, path, "application/pdf", extra_headers={"X-Dsocr-Figures": "drop"})
    assert "![" not in dropped["page_content"] and "Revenue grew." in dropped["page_content"]


# ---------------------------------------------------------------------------------------------- refusals


def test_without_the_key_it_is_401(live: LiveServer, tmp_path: Path, scripted: Engine) -> None:
    path = stored(tmp_path, "scan.pdf", pdf_bytes(tmp_path, 1))
    for key in (None, "wrong-key"):
        with pytest.raises(LoadError) as refused:
            owui_load(live.base, path, "application/pdf", api_key=key)
        assert refused.value.status == 401
        assert "API key" in refused.value.error["message"]


def test_a_broken_file_is_a_4xx_with_a_message(live: LiveServer, tmp_path: Path) -> None:
    good = pdf_bytes(tmp_path, 1)
    cases = {"truncated.pdf": good[: len(good) // 2], "not-a.pdf": b"%PDF-1.7\nnothing here\n",
             "half.png": DOC_IMAGE.read_bytes()[:200]}
    for name, data in cases.items():
        with pytest.raises(LoadError) as refused:
            owui_load(live.base, stored(tmp_path, name, data), "application/pdf")
        assert 400 <= refused.value.status < 500, (name, refused.value)
        assert refused.value.error["message"], name


def test_an_unsupported_binary_is_415(live: LiveServer, tmp_path: Path) -> None:
    zipped = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("word/document.xml", "<w:document/>")
    path = stored(tmp_path, "letter.docx", zipped.getvalue())
    mime = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    with pytest.raises(LoadError) as refused:
        owui_load(live.base, path, mime)
    assert refused.value.status == 415
    assert "letter.docx" in refused.value.error["message"] and "PDF" in refused.value.error["message"]


def test_too_many_pages_is_400_before_any_is_read(live: LiveServer, tmp_path: Path) -> None:
    started = live.metric("dsocr_generations_total")
    for path in (stored(tmp_path, "long.pdf", pdf_bytes(tmp_path, MAX_DOCUMENT_PAGES + 1)),
                 stored(tmp_path, "long.tiff", tiff_bytes(MAX_DOCUMENT_PAGES + 2))):
        with pytest.raises(LoadError) as refused:
            owui_load(live.base, path, None)
        assert refused.value.status == 400
        assert f"at most {MAX_DOCUMENT_PAGES}" in refused.value.error["message"]
        assert "--max-document-pages" in refused.value.error["message"]
    assert live.metric("dsocr_generations_total") == started


def test_a_body_over_the_limit_is_413(live: LiveServer, tmp_path: Path) -> None:
    path = stored(tmp_path, "huge.pdf", b"%PDF-1.7\n" + b"0" * (1024 * 1024 + 1))
    with pytest.raises(LoadError) as refused:
        owui_load(live.base, path, "application/pdf")
    assert refused.value.status == 413
    assert "larger than 1 MB" in refused.value.error["message"] and "--max-body-mb" in refused.value.error["message"]


def test_an_empty_body_and_bad_settings_are_400(live: LiveServer, tmp_path: Path) -> None:
    empty = stored(tmp_path, "empty.pdf", b"")
    with pytest.raises(LoadError) as refused:
        owui_load(live.base, empty, "application/pdf")
    assert refused.value.status == 400
    path = stored(tmp_path, "one.pdf", pdf_bytes(tmp_path, 1))
    for header, value in (("X-Dsocr-Figures", "inline"), ("X-Dsocr-Mode", "enormous")):
        with pytest.raises(LoadError) as refused:
            owui_load(live.base, path, "application/pdf", extra_headers={header: value})
        assert refused.value.status == 400 and value in refused.value.error["message"]


def test_host_and_origin_checks_apply(live: LiveServer, tmp_path: Path) -> None:
    data = pdf_bytes(tmp_path, 1)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/pdf"}
    rebound = requests.put(f"{live.base}/process", data=data, headers={**auth, "Host": "evil.example.com"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    cross_site = requests.put(f"{live.base}/process", data=data, headers={**auth, "Origin": "https://evil.example"})
    assert cross_site.status_code == 403 and cross_site.json()["error"]["code"] == "origin_not_allowed"


def test_pages_read_show_in_the_metrics_and_leave_no_ledger_charge(live: LiveServer, tmp_path: Path) -> None:
    before = live.metric("dsocr_generations_total")
    owui_load(live.base, stored(tmp_path, "two.pdf", pdf_bytes(tmp_path, 2)), "application/pdf")
    assert live.metric("dsocr_generations_total") == before + 2
    ledger = live.app.state.service.ledger
    assert ledger.requests == 0 and ledger.nbytes == 0


def test_a_client_that_hangs_up_cancels_the_pages(tmp_path: Path) -> None:
    """Open WebUI has no timeout, but a user can delete the file or stop the server: the pages stop with it."""
    backend = fakes.SlowBackend(fixture_tokenizer().eos_id, step_s=0.02)  # never ends by itself
    settings = ServerSettings(mode="tiny", max_new_tokens=2000)
    data = pdf_bytes(tmp_path, 3)
    with LiveServer(create_app(fakes.fixture_engine(backend, max_batch=2), settings)) as server:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.put(f"{server.base}/process", data=data, headers={"Content-Type": "application/pdf"},
                         timeout=(5, 0.5))
        server.wait_for_metric("dsocr_generations_cancelled_total", 2)  # the two pages running
        steps = backend.steps
        time.sleep(0.2)
        assert backend.steps == steps and server.metric("dsocr_requests_running") == 0
        assert backend.started == 2  # the third page never started


# ---------------------------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_the_tiny_model_reads_a_scanned_pdf(tmp_path: Path) -> None:
    engine = Engine.load(str(MODEL_DIR), backend="torch", device="cpu", dtype="float32")
    settings = ServerSettings(mode="tiny", api_key=KEY, max_new_tokens=8)
    with LiveServer(create_app(engine, settings)) as server:
        items = owui_load(server.base, stored(tmp_path, "scan.pdf", pdf_bytes(tmp_path, 2)), "application/pdf")
    assert [item["metadata"]["page"] for item in items] == [0, 1]
    assert all(item["metadata"]["finish_reason"] in ("stop", "length") for item in items)
    assert all(isinstance(item["page_content"], str) for item in items)


def test_the_key_is_checked_before_the_body_is_read(live: LiveServer) -> None:
    """A client without the key is answered at once, though the body it announced never arrives."""
    import socket

    head = (f"PUT /process HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\nContent-Type: application/pdf\r\n"
            "Authorization: Bearer wrong-key\r\nContent-Length: 500000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        sock.sendall(head.encode())
        answer = sock.recv(4096).decode("latin-1")
    assert answer.startswith("HTTP/1.1 401"), answer
