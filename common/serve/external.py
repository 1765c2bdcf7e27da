"""Open WebUI's External content extraction engine: `PUT /process`.

Open WebUI (Documents -> Content Extraction Engine -> External) sends every file a user attaches or adds to a
knowledge base as the raw request body, with its stored MIME type as Content-Type (or none), `Authorization:
Bearer <key>` and `X-Filename: <URL-quoted {file_id}_{name}>`, and waits, without a timeout, for a JSON list of
`{"page_content", "metadata"}` items (both required in each). Here each item is a page: the CLI's Markdown, and
metadata as Open WebUI's own PDF loader gives it (`page` 0-based, which its citation links count from;
`page_label` the page's number), so citations point at the right page. A PDF, image or multi-page TIFF is read by
the model (common.serve.extraction); a UTF-8 text file (Markdown, CSV, code) comes back as it is, one item; any
other file is a 415 that says so (Open WebUI shows "Error loading document: 415 {body}").

Per request, `X-Dsocr-Mode` picks the resolution mode and `X-Dsocr-Figures` what figures become (Open WebUI can
send custom headers with the loader's requests): "reference" (default, `![img-0.jpeg](img-0.jpeg)`), "embed" (a
JPEG data URL) or "drop".
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import unquote

from litestar import Request, Response, put

from common.model.families import ModeOptions
from common.serve.errors import APIError
from common.serve.extraction import (
    PagedDocument,
    PageText,
    document_kind,
    embedded_link,
    number_figures,
    page_markdown,
    read_document,
    reference_link,
)
from common.serve.files import clean_filename
from common.serve.schema import encode

FIGURE_POLICIES = ("reference", "embed", "drop")
# Open WebUI names a stored file "{file id}_{original name}", the file id a UUID.
_FILE_ID_PREFIX = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}_")
ENGINE_NAME = "dsocr"


def file_name(x_filename: str | None) -> str:
    """The original file name from Open WebUI's X-Filename header (URL-quoted "{file_id}_{name}")."""
    name = unquote(x_filename or "", errors="replace")
    return clean_filename(_FILE_ID_PREFIX.sub("", clean_filename(name, "")))


def plain_text(data: bytes) -> str | None:
    """The body as text when it is UTF-8 without NUL bytes (a text file: Markdown, CSV, code), else None."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _item(text: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """One Document for Open WebUI; metadata without null values (vector stores refuse them)."""
    return {"page_content": text, "metadata": {key: value for key, value in metadata.items() if value is not None}}


def _items(paged: PagedDocument, pages: list[PageText], policy: str, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One item per page (runs on a prepare worker: embedding figures encodes JPEGs)."""
    numbered = number_figures(pages)
    link = embedded_link if policy == "embed" else reference_link
    items = []
    for page, figures in zip(pages, numbered, strict=True):
        shown = figures if policy != "drop" else [None] * len(figures)
        metadata = {**base, "page": page.index, "page_label": str(page.index + 1), "total_pages": paged.total_pages,
                    "finish_reason": page.result.finish_reason}
        items.append(_item(page_markdown(page, shown, link), metadata))
    return items


@put("/process", status_code=200, summary="Extract a document's text (Open WebUI's External content extraction)")
async def process_document(request: Request) -> Response[bytes]:
    state = request.app.state
    service, settings = state.service, state.settings
    name = file_name(request.headers.get("x-filename"))
    media_type = (request.headers.get("content-type") or "").partition(";")[0].strip().lower()
    policy = (request.headers.get("x-dsocr-figures") or settings.extract_figures).strip().lower()
    if policy not in FIGURE_POLICIES:
        raise APIError(400, f"X-Dsocr-Figures {policy!r}: use one of {', '.join(FIGURE_POLICIES)}",
                       param="X-Dsocr-Figures")
    mode = ModeOptions(request.headers.get("x-dsocr-mode") or settings.mode).resolve(settings.family)
    data = await request.body()
    if not data:
        raise APIError(400, "the request body is empty: send the file's bytes (Open WebUI's External loader does)")
    base = {"file_name": name, "content_type": media_type or None, "model": settings.model_ids[0],
            "processing_engine": ENGINE_NAME}
    loop = asyncio.get_running_loop()
    kind = await loop.run_in_executor(state.prepare_pool, document_kind, data)
    if kind is None:
        text = await loop.run_in_executor(state.prepare_pool, plain_text, data)  # the whole body: off the loop
        if text is None:
            raise APIError(415, f"{name} ({media_type or 'no content type'}) is not a PDF, an image or a text file: "
                           "dsocr reads PDFs and images (PNG, JPEG, WebP, TIFF, BMP, GIF) and returns text files as "
                           "they are", code="unsupported_media_type")
        metadata = {**base, "page": 0, "page_label": "1", "total_pages": 1}
        body = await loop.run_in_executor(state.prepare_pool, encode, [_item(text, metadata)])
        return Response(body, media_type="application/json")
    paged, pages, _ = await read_document(service, data, kind, name, mode, state.prepare_pool,
                                          request.scope.get("dsocr.ticket"), request.receive, param="file")
    metadata = {**base, "mode": mode.name}
    body = await loop.run_in_executor(state.prepare_pool, lambda: encode(_items(paged, pages, policy, metadata)))
    return Response(body, media_type="application/json")
