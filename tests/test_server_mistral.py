"""The Mistral OCR API (`POST /v1/ocr`, `/v1/files`) through the live server, driven by the official `mistralai`
SDK, unmodified, its server_url pointed at dsocr: every answer must pass the SDK's own response models.

A scripted stand-in model answers every page with grounded Markdown (a title, a figure, a paragraph) and a
document annotation request with JSON, so pages, figures and boxes are exact and quick; one slow test runs the
tiny real model with a JSON schema.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import MistralError
from PIL import Image

from common.engine.engine import Engine
from common.model.inputs import PreparedInputs
from server import ServerSettings, create_app
from tests import fakes
from tests.conftest import FIXTURES, MODEL_DIR, fixture_tokenizer
from tests.helpers import LiveServer, data_url, make_pdf

pytestmark = pytest.mark.server

KEY = "sk-mistral-compatible"
DOC_IMAGE = FIXTURES / "images" / "doc_text.png"
GROUNDED = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 150]]<|/det|>\n# Quarterly report\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 200, 600, 700]]<|/det|>\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 750, 900, 950]]<|/det|>\nRevenue grew."
)
ANNOTATION = '{"title": "Quarterly report", "pages": 2}'
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "pages"],
          "properties": {"title": {"type": "string"}, "pages": {"type": "integer"}}}
MAX_STORED_FILES = 3


class Scripted(fakes.ScriptedBackend):
    """GROUNDED for a page, ANNOTATION for a request that asks for JSON; remembers each prompt's text."""

    def __init__(self) -> None:
        self.tokenizer = fixture_tokenizer()
        self.prompts: list[tuple[str, int]] = []  # (prompt text without image tokens, images)
        super().__init__(self.reply, self.tokenizer.eos_id)

    def reply(self, inputs: PreparedInputs) -> list[int]:
        ids = [int(i) for i, image in zip(inputs.input_ids, inputs.images_seq_mask, strict=True) if not image]
        text = self.tokenizer.decode(ids)
        self.prompts.append((text, len(inputs.images)))
        return self.tokenizer.encode(ANNOTATION if "JSON" in text else GROUNDED)


@pytest.fixture(scope="module")
def backend() -> Scripted:
    return Scripted()


@pytest.fixture(scope="module")
def live(backend: Scripted) -> Iterator[LiveServer]:
    settings = ServerSettings(mode="tiny", api_key=KEY, max_stored_files=MAX_STORED_FILES, max_document_pages=6)
    with LiveServer(create_app(fakes.fixture_engine(backend), settings)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Mistral:
    return Mistral(api_key=KEY, server_url=live.base)


@pytest.fixture(scope="module")
def pdf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_pdf(tmp_path_factory.mktemp("mistral") / "scan.pdf", 2).read_bytes()


def pdf_url(pdf: bytes) -> str:
    return "data:application/pdf;base64," + base64.b64encode(pdf).decode()


def refused(call: Any, status: int) -> MistralError:
    with pytest.raises(MistralError) as error:
        call()
    assert error.value.status_code == status, error.value.body
    return error.value


# ---------------------------------------------------------------------------------------------- documents


def test_a_data_url_pdf(client: Mistral, pdf: bytes) -> None:
    answer = client.ocr.process(model="mistral-ocr-latest",
                                document={"type": "document_url", "document_url": pdf_url(pdf)})
    assert answer.model == "deepseek-ocr"
    assert answer.usage_info.pages_processed == 2 and answer.usage_info.doc_size_bytes == len(pdf)
    assert [page.index for page in answer.pages] == [0, 1]
    for number, page in enumerate(answer.pages):
        assert page.dimensions is not None
        # make_pdf's pages are 300 x 400 pt, rendered at 144 dpi
        assert (page.dimensions.dpi, page.dimensions.width, page.dimensions.height) == (144, 600, 800)
        assert page.markdown.startswith("# Quarterly report") and "Revenue grew." in page.markdown
        [image] = page.images
        assert image.id == f"img-{number}.jpeg"  # numbered across the document
        assert f"![{image.id}]({image.id})" in page.markdown
        # the figure's box, [100, 200, 600, 700] of the model's 0-999 grid, in the page's pixels
        assert (image.top_left_x, image.top_left_y) == (60, 160)
        assert (image.bottom_right_x, image.bottom_right_y) == (360, 560)
        assert image.image_base64 is None


def test_figures_as_base64_and_limited(client: Mistral, pdf: bytes) -> None:
    answer = client.ocr.process(model="mistral-ocr-latest", include_image_base64=True, image_limit=1,
                                document={"type": "document_url", "document_url": pdf_url(pdf)})
    [first], second = answer.pages[0].images, answer.pages[1].images
    assert second == [] and "![" not in answer.pages[1].markdown  # past image_limit: no image, no link
    assert first.image_base64 is not None and first.image_base64.startswith("data:image/jpeg;base64,")
    crop = Image.open(io.BytesIO(base64.b64decode(first.image_base64.split(",", 1)[1])))
    assert crop.size == (300, 400)
    small = client.ocr.process(model="mistral-ocr-latest", image_min_size=500,
                               document={"type": "document_url", "document_url": pdf_url(pdf)})
    assert all(page.images == [] for page in small.pages)


def test_an_image_url(client: Mistral) -> None:
    answer = client.ocr.process(model="mistral-ocr-latest",
                                document={"type": "image_url", "image_url": data_url(DOC_IMAGE)})
    [page] = answer.pages
    width, height = Image.open(DOC_IMAGE).size
    assert page.index == 0 and page.dimensions is not None
    assert (page.dimensions.width, page.dimensions.height) == (width, height)
    assert page.markdown.startswith("# Quarterly report")


def test_a_page_subset(client: Mistral, pdf: bytes) -> None:
    for pages in ([1], "1"):
        answer = client.ocr.process(model="mistral-ocr-latest", pages=pages,
                                    document={"type": "document_url", "document_url": pdf_url(pdf)})
        assert [page.index for page in answer.pages] == [1]
        assert answer.usage_info.pages_processed == 1
        assert answer.pages[0].images[0].id == "img-0.jpeg"
    missing = refused(lambda: client.ocr.process(model="mistral-ocr-latest", pages=[5], document={
        "type": "document_url", "document_url": pdf_url(pdf)}), 400)
    assert "page index 5" in missing.body and '"param":"pages"' in missing.body


def test_blocks_name_every_grounded_part(client: Mistral) -> None:
    answer = client.ocr.process(model="mistral-ocr-latest", include_blocks=True,
                                document={"type": "image_url", "image_url": data_url(DOC_IMAGE)})
    blocks = answer.pages[0].blocks
    assert isinstance(blocks, list)
    assert [block.type for block in blocks] == ["title", "image", "text"]
    image_block = blocks[1]
    assert image_block.image_id == "img-0.jpeg" and image_block.content == "![img-0.jpeg](img-0.jpeg)"
    assert blocks[0].content == "# Quarterly report" and blocks[2].content == "Revenue grew."


# ---------------------------------------------------------------------------------------------- files


def test_upload_signed_url_ocr_delete(client: Mistral, live: LiveServer, pdf: bytes) -> None:
    """The flow Open WebUI's Mistral OCR loader uses by default."""
    uploaded = client.files.upload(file={"file_name": "scan.pdf", "content": pdf}, purpose="ocr")
    assert uploaded.size_bytes == len(pdf) and uploaded.filename == "scan.pdf" and uploaded.purpose == "ocr"
    signed = client.files.get_signed_url(file_id=uploaded.id, expiry=1)
    assert signed.url.startswith(live.base) and uploaded.id in signed.url
    # this server's own signed URL is read from its store: a loopback URL would be refused if it were fetched
    answer = client.ocr.process(model="mistral-ocr-latest",
                                document={"type": "document_url", "document_url": signed.url})
    assert answer.usage_info.pages_processed == 2
    by_id = client.ocr.process(model="mistral-ocr-latest", document={"type": "file", "file_id": uploaded.id})
    assert [page.markdown for page in by_id.pages] == [page.markdown for page in answer.pages]
    deleted = client.files.delete(file_id=uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    refused(lambda: client.files.get_signed_url(file_id=uploaded.id), 404)
    gone = refused(lambda: client.ocr.process(model="mistral-ocr-latest", document={
        "type": "document_url", "document_url": signed.url}), 404)
    assert "no file" in gone.body
    assert live.app.state.files.files() == []


def test_a_signed_url_reads_without_the_key_and_only_unaltered(client: Mistral, live: LiveServer,
                                                                 pdf: bytes) -> None:
    uploaded = client.files.upload(file={"file_name": "scan.pdf", "content": pdf}, purpose="ocr")
    try:
        url = client.files.get_signed_url(file_id=uploaded.id).url
        assert httpx.get(url, timeout=10).content == pdf
        altered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
        assert httpx.get(altered, timeout=10).status_code == 401
        # an altered URL is an ordinary URL: fetched under the usual rules, which refuse a loopback address
        error = refused(lambda: client.ocr.process(model="mistral-ocr-latest", document={
            "type": "document_url", "document_url": altered}), 400)
        assert "document_url" in error.body
    finally:
        client.files.delete(file_id=uploaded.id)


def test_the_file_store_is_bounded(client: Mistral, live: LiveServer, pdf: bytes) -> None:
    ids = [client.files.upload(file={"file_name": f"{i}.pdf", "content": pdf}, purpose="ocr").id
           for i in range(MAX_STORED_FILES)]
    try:
        full = refused(lambda: client.files.upload(file={"file_name": "more.pdf", "content": pdf}, purpose="ocr"),
                       429)
        assert "--max-stored-files" in full.body
        listed = httpx.get(f"{live.base}/v1/files", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        assert sorted(f["id"] for f in listed["data"]) == sorted(ids)
    finally:
        for file_id in ids:
            client.files.delete(file_id=file_id)


def test_uploads_must_be_forms_for_ocr(live: LiveServer, pdf: bytes) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    raw = httpx.post(f"{live.base}/v1/files", content=pdf, headers={**auth, "Content-Type": "application/pdf"})
    assert raw.status_code == 415 and "multipart/form-data" in raw.json()["error"]["message"]
    other = httpx.post(f"{live.base}/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "fine-tune"},
                       headers=auth)
    assert other.status_code == 400 and other.json()["error"]["param"] == "purpose"
    no_key = httpx.post(f"{live.base}/v1/files", files={"file": ("scan.pdf", pdf)}, data={"purpose": "ocr"})
    assert no_key.status_code == 401
    assert live.app.state.files.files() == []


# ---------------------------------------------------------------------------------------------- annotation, refusals


def test_document_annotation_reads_every_page_in_one_request(client: Mistral, backend: Scripted,
                                                             pdf: bytes) -> None:
    before = len(backend.prompts)
    answer = client.ocr.process(
        model="mistral-ocr-latest", document={"type": "document_url", "document_url": pdf_url(pdf)},
        document_annotation_format={"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA}})
    assert json.loads(answer.document_annotation) == json.loads(ANNOTATION)
    assert len(answer.pages) == 2
    prompts = backend.prompts[before:]
    annotation = [(text, images) for text, images in prompts if "JSON" in text]
    assert annotation == [(annotation[0][0], 2)] and "title" in annotation[0][0] and "pages" in annotation[0][0]
    assert sum("JSON" not in text for text, _ in prompts) == 2  # and one request per page


@pytest.mark.parametrize(("field", "value"), [
    ("bbox_annotation_format", {"type": "json_schema", "json_schema": {"name": "box", "schema": {"type": "object"}}}),
    ("table_format", "html"),
    ("extract_header", True),
    ("confidence_scores_granularity", "page"),
])
def test_an_unsupported_field_is_400_naming_it(client: Mistral, field: str, value: Any) -> None:
    error = refused(lambda: client.ocr.process(model="mistral-ocr-latest", **{field: value}, document={
        "type": "image_url", "image_url": data_url(DOC_IMAGE)}), 400)
    assert json.loads(error.body)["error"]["param"] == field and field in error.body


def test_bad_documents_are_400(client: Mistral, live: LiveServer) -> None:
    text = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    error = refused(lambda: client.ocr.process(model="mistral-ocr-latest", document={
        "type": "document_url", "document_url": text}), 400)
    assert "not a PDF or an image" in error.body
    ftp = refused(lambda: client.ocr.process(model="mistral-ocr-latest", document={
        "type": "document_url", "document_url": "ftp://example.com/a.pdf"}), 400)
    assert "data: URL" in ftp.body
    wrong_key = Mistral(api_key="nope", server_url=live.base)
    refused(lambda: wrong_key.ocr.process(model="mistral-ocr-latest", document={
        "type": "image_url", "image_url": data_url(DOC_IMAGE)}), 401)


# ---------------------------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_the_tiny_model_fills_a_document_annotation_by_its_schema(tmp_path: Path) -> None:
    import jsonschema

    # bounded values: a random-weight model would otherwise write until the token budget ends
    schema = {**SCHEMA, "properties": {"title": {"type": "string", "maxLength": 6},
                                       "pages": {"type": "integer", "minimum": 0, "maximum": 9}}}
    engine = Engine.load(str(MODEL_DIR), backend="torch", device="cpu", dtype="float32")
    settings = ServerSettings(mode="tiny", api_key=KEY, max_new_tokens=64)
    pdf = make_pdf(tmp_path / "scan.pdf", 2).read_bytes()
    with LiveServer(create_app(engine, settings)) as server:
        answer = Mistral(api_key=KEY, server_url=server.base).ocr.process(
            model="mistral-ocr-latest", document={"type": "document_url", "document_url": pdf_url(pdf)},
            document_annotation_format={"type": "json_schema", "json_schema": {"name": "report", "schema": schema,
                                                                               "strict": True}})
    assert len(answer.pages) == 2
    jsonschema.validate(json.loads(answer.document_annotation), schema)
