"""The Mistral OCR API: `POST /v1/ocr`, and the files it reads (`/v1/files`, common.serve.files).

`POST /v1/ocr` takes a document as a `document_url` (a data: URL, an http(s) URL fetched under the usual SSRF rules,
or this server's own signed URL, read from the file store), an `image_url` or a `file` (an uploaded file's id), and
answers one page object per page read: the CLI's Markdown with figures linked the way Mistral's is
(`![img-0.jpeg](img-0.jpeg)`), the figures' boxes (and crops with `include_image_base64`), the page's pixel size and
resolution, and with `include_blocks` the model's grounding boxes as blocks. `document_annotation_format` (a JSON
schema) adds `document_annotation`: one request with every page read, its output constrained by the schema. Fields
this model cannot honour (bbox annotations, tables split out, headers and footers split out, confidence scores)
are refused, naming the field. The `model` field is accepted whatever it says (clients hard-code
`mistral-ocr-latest`); the answer names the served model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from litestar import Request, Response, delete, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter
from msgspec import Meta, Struct

from common.documents.document import DEFAULT_DPI, decode_data_url, is_data_url, mode_pixel_budget
from common.engine.engine import Engine
from common.engine.sampling import SamplingOptions
from common.engine.structured import spec_from_response_format
from common.errors import InputError
from common.model.families import ModeOptions
from common.model.modes import Mode
from common.model.prompt import IMAGE_TOKEN, extract_fields, task_prompt
from common.serve.chat import MediaRef
from common.serve.errors import APIError
from common.serve.extraction import (
    Figure,
    PagedDocument,
    PageText,
    PageWork,
    discharge,
    document_kind,
    enclosing_box,
    finished,
    jpeg_data_url,
    number_figures,
    page_markdown,
    read_document,
    reference_link,
    submit_charged,
)
from common.serve.files import DEFAULT_URL_EXPIRY_H, MAX_URL_EXPIRY_H, StoredFiles, clean_filename
from common.serve.guard import bearer_matches
from common.serve.media import is_remote, media_bytes
from common.serve.schema import encode

log = logging.getLogger("dsocr.server")
NonNegative = Annotated[int, Meta(ge=0, le=1 << 20)]
# DeepSeek-OCR's grounding labels as the Mistral API's block types (anything else is "text").
BLOCK_TYPES = {"title": "title", "sub_title": "title", "image": "image", "image_caption": "caption",
               "table_caption": "caption", "caption": "caption", "table": "table", "equation": "equation",
               "formula": "equation", "header": "header", "page_header": "header", "footer": "footer",
               "page_footer": "footer", "page_number": "footer", "footnote": "footer", "table_footnote": "footer",
               "list": "list", "code": "code", "reference": "references", "references": "references"}


class OcrRequest(Struct, kw_only=True):
    """`POST /v1/ocr` as the mistralai SDK sends it (fields it may send that change the answer are refused by
    `refuse_unsupported`; others are ignored)."""

    document: dict[str, Any]
    model: str | None = None
    pages: list[NonNegative] | str | None = None
    include_image_base64: bool | None = None
    image_limit: NonNegative | None = None
    image_min_size: NonNegative | None = None
    bbox_annotation_format: Any = None
    document_annotation_format: Any = None
    document_annotation_prompt: str | None = None
    table_format: str | None = None
    extract_header: bool | None = None
    extract_footer: bool | None = None
    include_blocks: bool | None = None
    confidence_scores_granularity: str | None = None
    id: str | None = None


def refuse_unsupported(body: OcrRequest) -> None:
    unsupported = {
        "bbox_annotation_format": body.bbox_annotation_format is not None,
        "table_format": body.table_format is not None,  # tables stay in the Markdown (as HTML, as the model writes)
        "extract_header": bool(body.extract_header),
        "extract_footer": bool(body.extract_footer),
        "confidence_scores_granularity": body.confidence_scores_granularity is not None,
    }
    for name, asked in unsupported.items():
        if asked:
            raise APIError(400, f"{name} is not supported by this server (DeepSeek-OCR): leave it out", param=name)
    if body.document_annotation_prompt is not None and body.document_annotation_format is None:
        raise APIError(400, "document_annotation_prompt needs document_annotation_format (the JSON schema)",
                       param="document_annotation_prompt")


def page_indexes(value: list[int] | str | None) -> list[int] | None:
    """`pages` as 0-based indexes: a list, or text such as "0,2-4"; None: every page."""
    if value is None:
        return None
    if isinstance(value, str):
        indexes: list[int] = []
        for part in value.replace(" ", "").split(","):
            first, dash, last = part.partition("-")
            if not part.isascii() or not first.isdigit() or (dash and not last.isdigit()) or len(part) > 20:
                raise APIError(400, f"pages {value!r}: use 0-based page indexes and ranges, e.g. '0,2-4'",
                               param="pages")
            end = int(last) if dash else int(first)
            if end < int(first) or end - int(first) > 100_000:
                raise APIError(400, f"pages {value!r}: a range goes upwards", param="pages")
            indexes += range(int(first), end + 1)
        value = indexes
    if not value:
        raise APIError(400, "pages is empty: name at least one page (0-based), or leave it out for all",
                       param="pages")
    return sorted(set(value))


# ------------------------------------------------------------------------------------------------ the document


async def document_content(request: Request, body: OcrRequest) -> tuple[bytes | Path, str]:
    """The document's bytes (or its stored file) and a name for it."""
    state = request.app.state
    store: StoredFiles = state.files
    document = body.document
    loop = asyncio.get_running_loop()
    if "file_id" in document and document.get("type", "file") == "file":
        stored = store.get(str(document["file_id"]))
        return stored.path, stored.filename
    url: Any = None
    param = "document"
    if "document_url" in document and document.get("type", "document_url") == "document_url":
        url, param = document["document_url"], "document.document_url"
    elif "image_url" in document and document.get("type", "image_url") == "image_url":
        url, param = document["image_url"], "document.image_url"
        url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url or url.isspace():  # isspace stops at the first other character
        raise APIError(400, "document: give {\"type\": \"document_url\", \"document_url\": URL}, {\"type\": "
                       "\"image_url\", \"image_url\": URL} or {\"type\": \"file\", \"file_id\": ID}", param=param)
    name = clean_filename(str(document.get("document_name") or ""), "")
    if (stored := store.signed(url)) is not None:
        return stored.path, name or stored.filename
    if is_data_url(url):  # looks at the URL's head only: nothing on the event loop is proportional to its size
        _, data = await loop.run_in_executor(state.prepare_pool, decode_data_url, url)
        return data, name or "document"
    if not is_remote(MediaRef(url)):
        raise APIError(400, "the document URL must be a data: URL, an http(s) URL or a signed URL of this server's "
                       "files", param=param)
    policy = state.settings.fetch
    try:
        _, data = await asyncio.wait_for(loop.run_in_executor(state.fetch_pool, media_bytes, MediaRef(url), policy),
                                         timeout=policy.timeout_s + 1.0)
    except TimeoutError:
        raise APIError(400, f"fetching the document took longer than {policy.timeout_s:g} s", param=param) from None
    except InputError as exc:
        raise APIError(400, str(exc), param=param) from None
    return data, name or clean_filename(url.split("?")[0], "document")


def _read_kind(content: bytes | Path) -> str:
    if isinstance(content, bytes):
        data = content
    else:
        with content.open("rb") as stored:
            data = stored.read(1 << 20)  # enough for any header
    kind = document_kind(data)
    if kind is None:
        raise InputError("the document is not a PDF or an image this server reads (PNG, JPEG, WebP, TIFF, BMP, GIF)",
                         param="document")
    return kind


# ------------------------------------------------------------------------------------------------ the annotation


def annotation(spec: Any, instruction: str | None, mode: Mode, request: Request
               ) -> Callable[[Engine, PagedDocument], Awaitable[str]]:
    """`document_annotation`: one request with the pages read, the output constrained by the schema. Checked when
    the document is opened (its pages must fit one request's limits), before any page is read."""
    state = request.app.state
    settings = state.settings
    limits = settings.limits
    fields = extract_fields(spec.schema) if spec.kind == "json_schema" else []
    text = instruction if instruction is not None else task_prompt("extract", fields=fields, family=settings.family)
    text = text.replace(IMAGE_TOKEN, "").strip()  # prepare_inputs puts one <image> per page in front

    def start(engine: Engine, paged: PagedDocument) -> Awaitable[str]:
        where = "document_annotation_format"
        if len(paged.indexes) > limits.max_images:
            raise InputError(f"a document annotation reads every page in one request: {len(paged.indexes)} pages, "
                             f"at most {limits.max_images} (--max-images); name fewer with pages", param=where)
        try:
            limits.check_image_tokens(mode, paged.sizes)
        except InputError as exc:
            raise InputError(f"a document annotation reads every page in one request: {exc}; name fewer pages "
                             "with pages", param=where) from None
        params = SamplingOptions(json_spec=spec).resolve(settings.max_new_tokens)
        work = PageWork(engine, mode, text, params, limits, request.scope.get("dsocr.ticket"))
        return _annotate(work, paged, state.prepare_pool)

    return start


async def _annotate(work: PageWork, paged: PagedDocument, pool: Any) -> str:
    def prepare() -> Any:
        images = [paged.document.render(i + 1, DEFAULT_DPI, mode_pixel_budget(work.mode), work.limits.max_image_pixels)
                  for i in paged.indexes]
        return work.engine.prepare(work.prompt, images, work.mode)

    prepared = await asyncio.get_running_loop().run_in_executor(pool, prepare)
    handle = await submit_charged(work, prepared, pool)
    try:
        result = await finished(handle)
    finally:
        discharge(work, prepared)
    if result.finish_reason == "length":  # returned as it is: the pages were read, and the answer says what it is
        log.warning("%s: the document annotation reached the token budget (--max-new-tokens) before its JSON ended",
                    paged.name)
    return result.text


# ------------------------------------------------------------------------------------------------ the answer


def _box(box: tuple[int, int, int, int]) -> dict[str, int]:
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    return {"top_left_x": x1, "top_left_y": y1, "bottom_right_x": x2, "bottom_right_y": y2}


def _blocks(page: PageText, figures: list[Figure | None]) -> list[dict[str, Any]]:
    """The page's grounding groups as the API's blocks, in reading order: one per box, one per figure kept."""
    blocks, figure_index = [], 0
    for group in page.groups:
        if group.is_figure:
            figure = figures[figure_index] if figure_index < len(figures) else None
            figure_index += 1
            if figure is not None:
                blocks.append({**_box(figure.box), "content": reference_link(figure), "type": "image",
                               "image_id": figure.id})
            continue
        kind = BLOCK_TYPES.get(group.label.strip().lower(), "text")
        inside = [enclosing_box([box], page.size) for box in group.boxes]  # clipped to the page
        blocks += [{**_box(box), "content": group.text, "type": kind} for box in inside if box is not None]
    return blocks


def ocr_response(pages: list[PageText], body: OcrRequest, model: str, nbytes: int, annotated: str | None
                 ) -> dict[str, Any]:
    """The OCRResponse (runs on a prepare worker: figures may be encoded)."""
    numbered = number_figures(pages, body.image_limit, body.image_min_size or 0)
    out = []
    for page, figures in zip(pages, numbered, strict=True):
        images = [{"id": f.id, **_box(f.box), "image_base64": jpeg_data_url(f.image) if body.include_image_base64
                   else None} for f in figures if f is not None]
        width, height = page.size
        entry: dict[str, Any] = {"index": page.index, "markdown": page_markdown(page, figures, reference_link),
                                 "images": images, "dimensions": {"dpi": page.dpi, "height": height, "width": width}}
        if body.include_blocks:
            entry["blocks"] = _blocks(page, figures)
        out.append(entry)
    answer: dict[str, Any] = {"pages": out, "model": model,
                              "usage_info": {"pages_processed": len(pages), "doc_size_bytes": nbytes}}
    if annotated is not None:
        answer["document_annotation"] = annotated
    return answer


@post("/ocr", status_code=200, summary="OCR a document (Mistral OCR API)")
async def ocr(request: Request, data: Annotated[OcrRequest, Body(media_type=RequestEncodingType.JSON)]
              ) -> Response[bytes]:
    state = request.app.state
    service, settings = state.service, state.settings
    refuse_unsupported(data)
    wanted = page_indexes(data.pages)
    mode = ModeOptions(settings.mode).resolve(settings.family)
    loop = asyncio.get_running_loop()
    # the schema's shape is checked on a request thread, as a chat's is (its size is the client's to choose)
    spec = None if data.document_annotation_format is None else await loop.run_in_executor(
        state.request_pool, spec_from_response_format, data.document_annotation_format, "document_annotation_format")
    if spec is not None:  # compiled now, so that a schema the engine cannot enforce is refused before any work
        await loop.run_in_executor(state.prepare_pool, service.ready_engine().compile_json_spec, spec)
    content, name = await document_content(request, data)
    kind = await loop.run_in_executor(state.prepare_pool, _read_kind, content)
    extra = annotation(spec, data.document_annotation_prompt, mode, request) if spec is not None else None
    paged, pages, annotated = await read_document(service, content, kind, name, mode, state.prepare_pool,
                                                  request.scope.get("dsocr.ticket"), request.receive, wanted,
                                                  extra=extra)
    body = await loop.run_in_executor(state.prepare_pool, lambda: encode(ocr_response(
        pages, data, settings.model_ids[0], paged.nbytes, annotated)))  # figures in base64: megabytes
    return Response(body, media_type="application/json")


# ------------------------------------------------------------------------------------------------ files


FileId = Annotated[str, Parameter(description="a file's id, as the upload answered it")]


def _store(request: Request) -> StoredFiles:
    return request.app.state.files


def _json(body: Any) -> Response[bytes]:
    return Response(encode(body), media_type="application/json")


@post("/files", status_code=200, summary="Upload a file for OCR (Mistral files API)")
async def upload_file(request: Request) -> Response[bytes]:
    form = await request.form()
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "send the document as the multipart field 'file'", param="file")
    purpose = str(form.get("purpose") or "ocr")
    if purpose != "ocr":
        raise APIError(400, f"purpose {purpose!r}: this server keeps files for OCR only (purpose 'ocr')",
                       param="purpose")
    expiry_text = str(form.get("expiry") or "").strip()
    if expiry_text and not (expiry_text.isascii() and expiry_text.isdigit() and len(expiry_text) <= 5
                            and 0 < int(expiry_text) <= 10_000):
        raise APIError(400, f"expiry {expiry_text!r}: hours, a positive whole number", param="expiry")
    data = await upload.read()
    if not data:
        raise APIError(400, "the file is empty", param="file")
    name = clean_filename(upload.filename or "", "document")
    loop = asyncio.get_running_loop()
    stored = await loop.run_in_executor(request.app.state.prepare_pool, _store(request).add, data, name, purpose,
                                        upload.content_type or "application/octet-stream",
                                        int(expiry_text) if expiry_text else None)
    return _json(stored.describe())


@get("/files", summary="List the uploaded files")
async def list_files(request: Request) -> Response[bytes]:
    files = [stored.describe() for stored in _store(request).files()]
    return _json({"data": files, "object": "list", "total": len(files)})


@get("/files/{file_id:str}", summary="Describe an uploaded file")
async def retrieve_file(request: Request, file_id: FileId) -> Response[bytes]:
    return _json({**_store(request).get(file_id).describe(), "deleted": False})


@delete("/files/{file_id:str}", status_code=200, summary="Delete an uploaded file")
async def delete_file(request: Request, file_id: FileId) -> Response[bytes]:
    stored = _store(request).delete(file_id)
    return _json({"id": stored.id, "object": "file", "deleted": True})


@get("/files/{file_id:str}/url", summary="A signed URL of an uploaded file (for POST /v1/ocr)")
async def signed_url(request: Request, file_id: FileId) -> Response[bytes]:
    expiry = request.query_params.get("expiry", str(DEFAULT_URL_EXPIRY_H)).strip()
    if not (expiry.isascii() and expiry.isdigit() and len(expiry) <= 4 and 1 <= int(expiry) <= MAX_URL_EXPIRY_H):
        raise APIError(400, f"expiry {expiry[:20]!r}: hours, from 1 to {MAX_URL_EXPIRY_H}", param="expiry")
    hours = int(expiry)
    store = _store(request)
    return _json({"url": store.signed_url(store.get(file_id), str(request.base_url), hours)})


@get("/v1/files/{file_id:str}/content", summary="An uploaded file's bytes (with the API key or a signed URL)")
async def file_content(request: Request, file_id: FileId) -> Response[bytes]:
    store = _store(request)
    key = request.app.state.settings.api_key
    if key and not bearer_matches(request.headers.get("authorization", ""), key) and \
            store.signed(str(request.url)) is None:
        raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>' (or use a "
                       "signed URL)", code="invalid_api_key")
    stored = store.get(file_id)
    data = await asyncio.get_running_loop().run_in_executor(request.app.state.prepare_pool, store.read, stored)
    return Response(data, media_type=stored.mimetype)


FILE_ROUTES = [upload_file, list_files, retrieve_file, delete_file, signed_url]  # under /v1, with the API key
