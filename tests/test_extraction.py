"""The pieces of the extraction routes without a server: documents opened and sized against the limits, a page's
result made into Markdown and figures (common.serve.extraction), Open WebUI's file names and text files
(common.serve.external), the Mistral request's pages and refusals (common.serve.mistral), and the file store
with its signed URLs (common.serve.files)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image

from common.engine.requests import GenerationResult
from common.errors import InputError
from common.model.families import resolve_mode
from common.serve.errors import APIError
from common.serve.external import file_name, plain_text
from common.serve.extraction import (
    _postprocess,
    document_kind,
    embedded_link,
    enclosing_box,
    number_figures,
    open_pages,
    page_markdown,
    reference_link,
)
from common.serve.files import StoredFiles, clean_filename
from common.serve.limits import RequestLimits
from common.serve.mistral import OcrRequest, page_indexes, refuse_unsupported
from tests.conftest import FIXTURES
from tests.helpers import make_pdf, page_image

TINY = resolve_mode("tiny")
LIMITS = RequestLimits()


def result(text: str) -> GenerationResult:
    return GenerationResult(text, [], "stop", 10, 5, 0, None)


def tiff(pages: int) -> bytes:
    images = [page_image(f"Page {i + 1}") for i in range(pages)]
    buffer = io.BytesIO()
    images[0].save(buffer, "TIFF", save_all=True, append_images=images[1:], compression="tiff_deflate")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- opening documents


def test_document_kind_reads_the_bytes() -> None:
    assert document_kind(b"%PDF-1.7\n...") == "pdf"
    assert document_kind((FIXTURES / "images" / "doc_text.png").read_bytes()) == "image"
    assert document_kind(tiff(2)) == "image"
    assert document_kind(b"PK\x03\x04 a zip") is None and document_kind(b"plain text") is None
    # text files that PIL reads as images (XBM, plain PPM) stay text
    assert document_kind(b"#define im_width 8\n#define im_height 1\nstatic char im_bits[] = {\n0x00\n};\n") is None
    assert document_kind(b"P1\n2 2\n0 1\n1 0\n") is None


def test_open_pages_counts_and_sizes_without_rendering(tmp_path: Path) -> None:
    data = make_pdf(tmp_path / "three.pdf", 3).read_bytes()
    paged = open_pages(data, "pdf", "three.pdf", None, TINY, LIMITS, max_pages=3)
    assert paged.indexes == [0, 1, 2] and paged.total_pages == 3 and paged.nbytes == len(data)
    assert paged.sizes == [(600, 800)] * 3 and paged.dpis == [144] * 3  # 300 x 400 pt at 144 dpi
    subset = open_pages(data, "pdf", "three.pdf", [2, 0, 2], TINY, LIMITS, max_pages=3)
    assert subset.indexes == [0, 2]


def test_open_pages_refuses_beyond_the_limits(tmp_path: Path) -> None:
    data = make_pdf(tmp_path / "five.pdf", 5).read_bytes()
    with pytest.raises(InputError, match="the document has 5 pages; at most 4"):
        open_pages(data, "pdf", "five.pdf", None, TINY, LIMITS, max_pages=4)
    # naming fewer pages than the limit reads them from a longer document
    assert open_pages(data, "pdf", "five.pdf", [4], TINY, LIMITS, max_pages=4).indexes == [4]
    with pytest.raises(InputError, match="5 pages asked for; at most 4"):
        open_pages(data, "pdf", "five.pdf", [0, 1, 2, 3, 4], TINY, LIMITS, max_pages=4)
    with pytest.raises(InputError, match="page index 7 does not exist: the document has 5 page"):
        open_pages(data, "pdf", "five.pdf", [7], TINY, LIMITS, max_pages=10)
    with pytest.raises(InputError, match="page 1: the images would take"):
        open_pages(data, "pdf", "five.pdf", [0], TINY, RequestLimits(max_image_tokens=10), max_pages=10)


def test_a_long_tiff_is_counted_only_to_the_limit() -> None:
    data = tiff(6)
    with pytest.raises(InputError, match="more than 3 pages; at most 3"):
        open_pages(data, "image", "fax.tiff", None, TINY, LIMITS, max_pages=3)
    assert open_pages(data, "image", "fax.tiff", [1, 3], TINY, LIMITS, max_pages=3).indexes == [1, 3]
    with pytest.raises(InputError, match="only the first 4 pages of a TIFF are counted"):
        open_pages(data, "image", "fax.tiff", [5], TINY, LIMITS, max_pages=3)


# ---------------------------------------------------------------------------------------------- a page's result


GROUNDED = (
    "<|ref|>title<|/ref|><|det|>[[0, 0, 999, 99]]<|/det|>\n# Report\n\n"
    "<|ref|>image<|/ref|><|det|>[[0, 100, 499, 499], [500, 100, 999, 299]]<|/det|>\n\n"  # one figure, two boxes
    "<|ref|>image<|/ref|><|det|>[[not a box]]<|/det|>\n\n"  # a figure without a usable box
    "<|ref|>image<|/ref|><|det|>[[0, 600, 999, 999]]<|/det|>\n\n"
    "<|ref|>text<|/ref|><|det|>[[0, 500, 999, 599]]<|/det|>\nBody text."
)


def test_each_markdown_figure_link_gets_its_own_figure() -> None:
    image = Image.new("RGB", (1000, 1000), "white")
    page = _postprocess(0, 144, image, result(GROUNDED))
    assert [label for label in (g.label for g in page.groups)] == ["title", "image", "image", "image", "text"]
    assert len(page.crops) == 3 and page.crops[1] is None
    first, third = page.crops[0], page.crops[2]
    assert first is not None and third is not None
    assert first[0] == (0, 100, 1000, 499) and first[1].size == (1000, 399)  # the box around both boxes
    assert third[0] == (0, 600, 1000, 1000)
    figures = number_figures([page])[0]
    assert [f.id if f else None for f in figures] == ["img-0.jpeg", None, "img-1.jpeg"]
    markdown = page_markdown(page, figures, reference_link)
    assert markdown == "# Report\n\n![img-0.jpeg](img-0.jpeg)\n\n![img-1.jpeg](img-1.jpeg)\n\nBody text."
    assert "<|" not in markdown and "dsocr-figure" not in markdown
    embedded = page_markdown(page, figures, embedded_link)
    assert embedded.count("](data:image/jpeg;base64,") == 2


def test_figures_are_numbered_across_pages_and_left_out_by_limit_and_size() -> None:
    image = Image.new("RGB", (1000, 1000), "white")
    pages = [_postprocess(i, 144, image, result(GROUNDED)) for i in range(2)]
    ids = [[f.id if f else None for f in figures] for figures in number_figures(pages)]
    assert ids == [["img-0.jpeg", None, "img-1.jpeg"], ["img-2.jpeg", None, "img-3.jpeg"]]
    limited = [[f.id if f else None for f in figures] for figures in number_figures(pages, limit=3)]
    assert limited == [["img-0.jpeg", None, "img-1.jpeg"], ["img-2.jpeg", None, None]]
    large = [[f.id if f else None for f in figures] for figures in number_figures(pages, min_size=400)]
    assert large == [[None, None, "img-0.jpeg"], [None, None, "img-1.jpeg"]]  # the first is 399 px high
    assert page_markdown(pages[0], number_figures(pages, min_size=400)[0], reference_link).count("![") == 1


def test_an_empty_or_plain_answer_is_its_text() -> None:
    image = Image.new("RGB", (100, 100), "white")
    assert _postprocess(0, 72, image, result("")).text == ""
    plain = _postprocess(0, 72, image, result("Just text.<｜end▁of▁sentence｜>"))
    assert plain.text == "Just text." and plain.crops == [] and plain.groups == []


def test_enclosing_box_orders_and_clips() -> None:
    assert enclosing_box([(50, 60, 10, 20)], (100, 100)) == (10, 20, 50, 60)
    assert enclosing_box([(-5, -5, 20, 20), (90, 90, 120, 130)], (100, 100)) == (0, 0, 100, 100)
    assert enclosing_box([(150, 150, 200, 200)], (100, 100)) is None


# ---------------------------------------------------------------------------------------------- request details


@pytest.mark.parametrize(("header", "name"), [
    ("0b7e2c1a-5d0e-4c55-9a43-2f6f0f1c9e11_Quarterly%20report.pdf", "Quarterly report.pdf"),
    ("0b7e2c1a-5d0e-4c55-9a43-2f6f0f1c9e11_Fa%C3%A7ade%20%E2%80%94%20plan.png", "Façade — plan.png"),
    ("report_2025.pdf", "report_2025.pdf"),  # no file id in front: kept whole
    ("..%2F..%2Fetc%2Fpasswd", "passwd"),
    ("a%0Ab%00.pdf", "ab.pdf"),
    (None, "document"),
])
def test_the_file_name_from_x_filename(header: str | None, name: str) -> None:
    assert file_name(header) == name


def test_plain_text_is_utf8_without_nul_bytes() -> None:
    assert plain_text("\ufeff# Notes\nÄ".encode()) == "# Notes\nÄ"
    assert plain_text("caf\xe9".encode("latin-1")) is None
    assert plain_text(b"text\x00with a NUL") is None


@pytest.mark.parametrize(("value", "indexes"), [
    (None, None), ([3, 1, 1], [1, 3]), ("0,2-4", [0, 2, 3, 4]), (" 1 , 5 ", [1, 5]), ("7", [7]),
])
def test_pages_as_a_list_or_text(value: list[int] | str | None, indexes: list[int] | None) -> None:
    assert page_indexes(value) == indexes


@pytest.mark.parametrize("value", ["", [], "4-2", "a", "1,,2", "²", "0-99999999", "1-", "-3"])
def test_bad_pages_are_400(value: list[int] | str) -> None:
    with pytest.raises(APIError) as refused:
        page_indexes(value)
    assert refused.value.status == 400 and refused.value.param == "pages"


def test_an_annotation_prompt_needs_its_schema() -> None:
    with pytest.raises(APIError) as refused:
        refuse_unsupported(OcrRequest(document={}, document_annotation_prompt="Extract the totals."))
    assert refused.value.param == "document_annotation_prompt"
    refuse_unsupported(OcrRequest(document={}, extract_header=False, include_blocks=True))  # false asks nothing


# ---------------------------------------------------------------------------------------------- the file store


def test_the_store_keeps_reads_and_deletes(tmp_path: Path) -> None:
    store = StoredFiles(max_files=4, max_bytes=1 << 20)
    try:
        kept = store.add(b"%PDF-1.7 ...", "scan.pdf", "ocr", "application/pdf")
        assert store.read(store.get(kept.id)) == b"%PDF-1.7 ..." and kept.path.suffix == ".pdf"
        assert store.add(tiff(2), "fax", "ocr", "image/tiff").path.suffix == ".tiff"  # its pages are counted
        assert [f.filename for f in store.files()] == ["scan.pdf", "fax"]
        assert kept.describe()["bytes"] == 12 and kept.describe()["object"] == "file"
        store.delete(kept.id)
        assert not kept.path.exists()
        with pytest.raises(APIError) as gone:
            store.get(kept.id)
        assert gone.value.status == 404
        with pytest.raises(APIError):
            store.get("../../etc/passwd")
        folder = kept.path.parent
    finally:
        store.close()
    assert not folder.exists()


def test_the_store_is_bounded_by_count_and_bytes() -> None:
    store = StoredFiles(max_files=2, max_bytes=100)
    try:
        with pytest.raises(APIError) as too_big:
            store.add(b"x" * 101, "big", "ocr", "application/pdf")
        assert too_big.value.status == 413 and "--max-stored-mb" in too_big.value.message
        store.add(b"x" * 60, "a", "ocr", "application/pdf")
        with pytest.raises(APIError) as full:
            store.add(b"x" * 60, "b", "ocr", "application/pdf")
        assert full.value.status == 429
        store.add(b"x" * 30, "c", "ocr", "application/pdf")
        with pytest.raises(APIError) as by_count:
            store.add(b"x", "d", "ocr", "application/pdf")
        assert by_count.value.status == 429 and "--max-stored-files" in by_count.value.message
    finally:
        store.close()


def test_files_expire() -> None:
    store = StoredFiles(max_files=2, max_bytes=100)
    try:
        short = store.add(b"x", "a", "ocr", "application/pdf", expiry_h=1)
        lasting = store.add(b"y", "b", "ocr", "application/pdf")
        assert lasting.expires_at - lasting.created_at == 24 * 3600  # at most a day
        assert store.sweep(now=time.time() + 2 * 3600) == 1
        assert [f.id for f in store.files()] == [lasting.id] and not short.path.exists()
    finally:
        store.close()


def test_signed_urls_name_a_file_until_they_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    store = StoredFiles(max_files=2, max_bytes=100)
    try:
        kept = store.add(b"x", "a", "ocr", "application/pdf")
        url = store.signed_url(kept, "http://localhost:8000/", expiry_h=1)
        assert url.startswith(f"http://localhost:8000/v1/files/{kept.id}/content?expires=")
        assert store.signed(url) == kept
        assert store.signed(url.replace("localhost:8000", "dsocr:9000")) == kept  # whatever host reached it
        assert store.signed(url[:-1] + ("0" if url[-1] != "0" else "1")) is None  # altered: not ours
        assert store.signed(url.replace("expires=", "expires=1")) is None
        assert store.signed("https://example.com/scan.pdf") is None
        assert StoredFiles(2, 100).signed(url) is None  # another server's key
        assert store.signed(url + "&pad=" + "x" * 5000) is None  # longer than any of ours: not even parsed
        assert store.signed("data:application/pdf;base64," + "A" * 5000) is None
        later = time.time() + 2 * 3600
        monkeypatch.setattr(time, "time", lambda: later)
        with pytest.raises(APIError) as expired:
            store.signed(url)
        assert expired.value.status == 400 and expired.value.code == "url_expired"
    finally:
        store.close()


def test_clean_filename() -> None:
    assert clean_filename("C:\\scans\\März.pdf") == "März.pdf"
    assert clean_filename("\x00\x1b[31m", "doc") == "[31m"
    assert clean_filename("", "doc") == "doc" and len(clean_filename("a" * 1000)) == 255
