"""common.documents.document: pdfium is entered by one thread at a time in this process, whatever the documents;
pages render in the worker processes (common.documents.render)."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pypdfium2
import pytest

from common.documents.document import decode_data_url, open_document
from common.errors import ImageError
from tests.hostile import pdf_bytes


class Overlap:
    """Counts threads inside wrapped pdfium calls; each call lingers so that unserialised calls do overlap."""

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self.calls = 0
        self._lock = threading.Lock()

    def wrap(self, function: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.inside += 1
                self.calls += 1
                self.most = max(self.most, self.inside)
            try:
                time.sleep(0.005)
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.inside -= 1

        return wrapped


def test_pdfium_is_entered_by_one_thread_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Different PDFs opened, counted, sized and rendered from 8 threads: no two pdfium calls of this process ever
    overlap (pdfium keeps global state across documents; without the process-wide lock this sees 8 threads
    inside at once), and no page renders in this process (the render workers do it)."""
    overlap = Overlap()
    monkeypatch.setattr(pypdfium2.PdfDocument, "__init__", overlap.wrap(pypdfium2.PdfDocument.__init__))
    monkeypatch.setattr(pypdfium2.PdfDocument, "get_page_size", overlap.wrap(pypdfium2.PdfDocument.get_page_size))
    in_process = Overlap()
    monkeypatch.setattr(pypdfium2.PdfPage, "render", in_process.wrap(pypdfium2.PdfPage.render))
    pdfs = [pdf_bytes([(200 + 10 * i, 300)] * 3) for i in range(8)]

    def pages(pdf: bytes) -> list[tuple[int, int]]:
        document = open_document(pdf)
        sizes = [document.page_size(page, dpi=72) for page in range(1, document.pages + 1)]
        rendered = [document.render(page, dpi=72).size for page in range(1, document.pages + 1)]
        assert rendered == sizes
        return rendered

    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(pages, pdfs * 2))
    assert [len(s) for s in sizes] == [3] * 16
    assert sizes[0][0] == (200, 300) and sizes[7][0] == (270, 300)
    assert overlap.calls >= 16 * 4  # every open and sizing went through the wrappers
    assert overlap.most == 1
    assert in_process.calls == 0


@pytest.mark.parametrize(
    ("url", "media_type", "data"),
    [
        ("data:image/png;base64,aGVsbG8=", "image/png", b"hello"),
        ("  DATA:Image/PNG;charset=x;BASE64,aGVs\nbG8=  ", "image/png", b"hello"),
        ("data:application/octet-stream;base64,-_-_", "application/octet-stream", b"\xfb\xff\xbf"),
        ("data:text/plain,hello%20world", "text/plain", b"hello world"),
    ],
)
def test_data_urls_are_decoded(url: str, media_type: str, data: bytes) -> None:
    assert decode_data_url(url) == (media_type, data)


def test_long_data_urls_are_decoded_across_pieces() -> None:
    payload = bytes(range(256)) * 20_000  # 5 MB: several pieces, a piece boundary inside a 4-character group
    text = base64.b64encode(payload).decode()
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))  # MIME line breaks
    assert decode_data_url("data:image/png;base64," + wrapped) == ("image/png", payload)
    assert decode_data_url("data:image/png;base64," + base64.urlsafe_b64encode(payload).decode())[1] == payload


@pytest.mark.parametrize("url", ["data:image/png;base64", "data:image/png;base64,%%%%", "data:image/png;base64,",
                                 "image/png;base64,aGVsbG8=", "data:" + "x" * 2000 + ",aGVsbG8="])
def test_malformed_data_urls_are_image_errors(url: str) -> None:
    with pytest.raises(ImageError):
        decode_data_url(url)
