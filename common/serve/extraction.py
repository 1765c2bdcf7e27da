"""Documents to Markdown for the extraction routes: Open WebUI's External loader (`PUT /process`,
common.serve.external) and the Mistral OCR API (`POST /v1/ocr`, common.serve.mistral).

A document (PDF, image, multi-page TIFF) is opened header-only and its pages counted and sized against the limits
(--max-document-pages for the document, then each page's image tokens as one request's) before anything is
rendered. Each page is then one engine request with the CLI's document prompt, admitted like a chat request (the
model must be ready, the queue must have room, the prepared inputs are charged to the request's ledger ticket).
The pages of a document go in together, up to the engine's batch, so they decode side by side, and one that
finishes makes room for the next; a document never holds more than half the waiting queue, so other clients'
requests still get in. Each finished page is post-processed as the CLI does (grounding to Markdown, figure crops:
common.documents.postprocess). A client that hangs up cancels the pages still running.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from common.documents.document import DEFAULT_DPI, Document, mode_pixel_budget, open_document
from common.documents.postprocess import Box, GroundingBox, clean_output, parse_grounding, to_markdown
from common.engine.engine import Engine
from common.engine.requests import GenerationResult, RequestHandle
from common.engine.sampling import SamplingOptions, SamplingParams
from common.engine.scheduler import QueueFullError
from common.engine.sequence import INTERACTIVE, inputs_nbytes
from common.errors import InputError
from common.model.modes import Mode
from common.serve.admission import ModelService
from common.serve.errors import APIError
from common.serve.ledger import LedgerFull, Ticket
from common.serve.limits import RequestLimits

log = logging.getLogger("dsocr.server")

FIGURE_DIR = "dsocr-figure"  # the figure links of a page's Markdown until the document's figures are numbered
_FIGURE_LINK = re.compile(r"!\[\]\(" + FIGURE_DIR + r"/(\d+)\.jpg\)")
_BLANK_LINES = re.compile(r"\n{3,}")  # what removed grounding groups leave behind: one blank line is enough
PROGRESS_PAGES = 4  # documents of this many pages or more report their progress in the server log
RETRY_S = 0.1  # a page waiting for room in a busy queue looks again after this long
IMAGE_DPI = 72  # what an image file's pixels are reported at (a PDF page: the resolution it was rendered at)
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "TIFF", "BMP", "GIF"})  # MPO: many phones' JPEGs

Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Figure:
    """A figure the model outlined: its crop, its box in the page image's pixels and its id in the document."""

    id: str  # "img-0.jpeg", numbered across the document in page order
    box: Box  # x1, y1, x2, y2
    image: Image.Image


@dataclass
class PageText:
    """One page's result. `text` is the CLI's Markdown, its figure links still placeholders (`page_markdown`)."""

    index: int  # 0-based page of the document
    text: str
    size: tuple[int, int]  # the page image's pixels (width, height): what boxes are measured in
    dpi: int
    groups: list[GroundingBox]  # every grounding group (titles, text, tables, figures ...), boxes in pixels
    # One entry per figure group, in the order the Markdown links them: its box and crop (None: no usable box).
    crops: list[tuple[Box, Image.Image] | None]
    result: GenerationResult


@dataclass
class PagedDocument:
    """A document opened for extraction: its pages counted and sized, none rendered yet."""

    document: Document
    name: str
    nbytes: int
    indexes: list[int]  # the 0-based pages to extract, in order
    sizes: list[tuple[int, int]]  # of those pages, as they will be rendered
    dpis: list[int]

    @property
    def total_pages(self) -> int:
        return self.document.pages


@dataclass
class PageWork:
    """What every page of one extraction shares."""

    engine: Engine
    mode: Mode
    prompt: str
    params: SamplingParams
    limits: RequestLimits
    ticket: Ticket | None = None
    started: float = field(default_factory=time.monotonic)


# ------------------------------------------------------------------------------------------------ opening


def document_kind(data: bytes) -> str | None:
    """'pdf' or 'image' by the bytes themselves (never by a client's word), None for anything else (a text file
    that happens to parse as a text-based image format, XBM or PPM, stays text)."""
    if data[:5] == b"%PDF-":
        return "pdf"
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return "image" if image.format in IMAGE_FORMATS else None
    except Image.DecompressionBombError:
        return "image"  # an image all the same: the limits refuse its size with their own message
    except Exception:  # any decoder complaint: not an image this server reads
        return None


def open_pages(content: bytes | Path, kind: str, name: str, wanted: list[int] | None, mode: Mode,
               limits: RequestLimits, max_pages: int, param: str = "pages") -> PagedDocument:
    """The document with the pages to extract (`wanted`: 0-based; None: all) counted and sized: InputError when it
    has more than `max_pages` pages, a wanted page does not exist or a page needs more image tokens than one
    request may take. Reads headers only (runs on a prepare worker)."""
    document = open_document(content, kind, name, max_pages=max_pages)  # a TIFF's pages counted to max_pages + 1
    if wanted is None and (document.capped or document.pages > max_pages):
        more = "more than " if document.capped else ""
        raise InputError(f"the document has {more}{document.pages - document.capped} pages; at most {max_pages} "
                         "are read per document (--max-document-pages)", param=param)
    indexes = list(range(document.pages)) if wanted is None else sorted(set(wanted))
    if len(indexes) > max_pages:
        raise InputError(f"{len(indexes)} pages asked for; at most {max_pages} are read per document "
                         "(--max-document-pages)", param=param)
    missing = [i for i in indexes if not 0 <= i < document.pages]
    if missing and document.capped:
        raise InputError(f"page index {missing[0]}: only the first {document.pages} pages of a TIFF are counted "
                         "(--max-document-pages)", param=param)
    if missing:
        raise InputError(f"page index {missing[0]} does not exist: the document has {document.pages} page(s), "
                         f"indexes 0-{document.pages - 1}", param=param)
    budget = mode_pixel_budget(mode)
    sizes, dpis = [], []
    for index in indexes:
        size = document.page_size(index + 1, DEFAULT_DPI, budget)
        try:
            limits.check_image_tokens(mode, [size])
        except InputError as exc:
            raise InputError(f"page {index + 1}: {exc}", param=exc.param) from None
        sizes.append(size)
        if kind == "pdf":  # rendered at 144 dpi unless the mode's pixel budget made it smaller
            full_width = document.page_size(index + 1, DEFAULT_DPI)[0]
            dpis.append(max(1, round(DEFAULT_DPI * size[0] / max(1, full_width))))
        else:
            dpis.append(IMAGE_DPI)
    nbytes = len(content) if isinstance(content, bytes) else content.stat().st_size
    return PagedDocument(document, name, nbytes, indexes, sizes, dpis)


# ------------------------------------------------------------------------------------------------ one page


def _prepare_page(work: PageWork, paged: PagedDocument, position: int) -> tuple[Image.Image, Any]:
    """The page rendered (in a render worker, for a PDF) and made into model inputs: runs on a prepare worker."""
    index = paged.indexes[position]
    image = paged.document.render(index + 1, DEFAULT_DPI, mode_pixel_budget(work.mode), work.limits.max_image_pixels)
    return image, work.engine.prepare(work.prompt, [image], work.mode)


def enclosing_box(boxes: list[Box], size: tuple[int, int]) -> Box | None:
    """The box around `boxes`, clipped to an image of `size`; None when nothing of it is inside."""
    width, height = size
    x1 = max(0, min(min(b[0], b[2]) for b in boxes))
    y1 = max(0, min(min(b[1], b[3]) for b in boxes))
    x2 = min(width, max(max(b[0], b[2]) for b in boxes))
    y2 = min(height, max(max(b[1], b[3]) for b in boxes))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _postprocess(index: int, dpi: int, image: Image.Image, result: GenerationResult) -> PageText:
    """The CLI's Markdown of a page (common.documents.outputs.page_record) and its figures: the Markdown links the
    k-th figure group of the output as FIGURE_DIR/k.jpg, whose crop is the box around all of that group's boxes."""
    raw = clean_output(result.text) if result.text.strip() else ""
    converted = to_markdown(raw, image.size, image_dir=FIGURE_DIR)
    groups = parse_grounding(raw, image.size)
    crops: list[tuple[Box, Image.Image] | None] = []
    for group in groups:
        if group.is_figure:
            box = enclosing_box(group.boxes, image.size) if group.boxes else None
            crops.append((box, image.crop(box).convert("RGB")) if box is not None else None)
    return PageText(index, converted.markdown.strip(), image.size, dpi, groups, crops, result)


async def submit_charged(work: PageWork, prepared: Any, pool: Executor, first: bool = True,
                         crowded: Callable[[], bool] | None = None) -> RequestHandle:
    """Submits prepared inputs, charging them to the request's ticket (`discharge` gives them back). A busy server
    refuses a document's first request (QueueFullError or LedgerFull: nothing is done yet); a later page waits
    for room instead of throwing away the pages already read."""
    loop = asyncio.get_running_loop()
    nbytes = inputs_nbytes(prepared)
    while True:
        if first or crowded is None or not crowded():
            try:
                if work.ticket is not None:
                    work.ticket.add(nbytes)
                try:
                    return await loop.run_in_executor(pool, lambda: work.engine.submit(
                        prepared, work.params, priority=INTERACTIVE))
                except BaseException:
                    discharge(work, prepared)
                    raise
            except (QueueFullError, LedgerFull):
                if first:
                    raise
        await asyncio.sleep(RETRY_S)


def discharge(work: PageWork, prepared: Any) -> None:
    """Gives back the ticket's charge for inputs whose generation has ended (a negative charge never fails)."""
    if work.ticket is not None:
        work.ticket.add(-inputs_nbytes(prepared))


async def finished(handle: RequestHandle) -> GenerationResult:
    """The handle's result, read on the event loop; cancelling the caller cancels the generation."""
    try:
        async for _ in handle.stream():
            pass
    finally:
        handle.cancel()  # a no-op once finished
    assert handle.result is not None
    return handle.result


async def _one_page(work: PageWork, paged: PagedDocument, position: int, pool: Executor, first: bool,
                    crowded: Callable[[], bool]) -> PageText:
    loop = asyncio.get_running_loop()
    image, prepared = await loop.run_in_executor(pool, _prepare_page, work, paged, position)
    handle = await submit_charged(work, prepared, pool, first, crowded)
    try:
        result = await finished(handle)
    finally:
        discharge(work, prepared)
    return await loop.run_in_executor(pool, _postprocess, paged.indexes[position], paged.dpis[position], image, result)


# ------------------------------------------------------------------------------------------------ a document


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _log_progress(paged: PagedDocument, done: int, started: float) -> None:
    total = len(paged.indexes)
    elapsed = time.monotonic() - started
    if total >= PROGRESS_PAGES and (done == total or done % max(1, total // 10) == 0):
        log.info("%s: %d/%d pages read (%.1f s, %.1f s a page)", paged.name, done, total, elapsed, elapsed / done)
    else:
        log.debug("%s: %d/%d pages read (%.1f s)", paged.name, done, total, elapsed)


async def extract_pages(work: PageWork, paged: PagedDocument, pool: Executor, max_queue: int,
                        receive: Receive | None = None, extra: Awaitable[Any] | None = None
                        ) -> tuple[list[PageText], Any]:
    """Every wanted page of `paged` through the engine, in page order (and `extra`, awaited alongside: the Mistral
    API's document annotation). APIError 429 when the first page finds no room; the first failure by page order
    otherwise (the other pages cancelled); 499 when the client hangs up."""
    engine = work.engine
    assert engine.core is not None
    core = engine.core
    window = max(1, core.max_batch) + 1  # the batch, and one page being prepared meanwhile
    room = max(1, max_queue // 2)  # waiting requests this document leaves to others

    def crowded() -> bool:
        return core.waiting >= room

    total = len(paged.indexes)
    if total >= PROGRESS_PAGES:
        log.info("%s: reading %d pages in mode %s", paged.name, total, work.mode.name)
    results: dict[int, PageText] = {}
    running: dict[asyncio.Task[PageText], int] = {}
    watcher = asyncio.ensure_future(_disconnected(receive)) if receive is not None else None
    extra_task = asyncio.ensure_future(extra) if extra is not None else None
    waiting_on: set[asyncio.Future[Any]] = {f for f in (watcher, extra_task) if f is not None}
    try:
        position = 0
        while position < total or running or (extra_task is not None and not extra_task.done()):
            while position < total and len(running) < window and (position == 0 or not crowded() or not running):
                task = asyncio.ensure_future(_one_page(work, paged, position, pool, position == 0, crowded))
                running[task] = position
                position += 1
            done, _ = await asyncio.wait({*running, *waiting_on}, return_when=asyncio.FIRST_COMPLETED)
            if watcher is not None and watcher in done:
                raise APIError(499, "client disconnected")
            if extra_task is not None and extra_task in done:
                waiting_on.discard(extra_task)
                extra_task.result()  # its error, now
            for task in sorted((t for t in done if t in running), key=running.__getitem__):
                running.pop(task)
                page = task.result()  # raises the page's error: the other pages are cancelled below
                results[page.index] = page
                _log_progress(paged, len(results), work.started)
        annotation = extra_task.result() if extra_task is not None else None
    finally:
        for task in [*running, *waiting_on]:
            task.cancel()
    return [results[i] for i in paged.indexes], annotation


# ------------------------------------------------------------------------------------------------ figures


def number_figures(pages: list[PageText], limit: int | None = None, min_size: int = 0) -> list[list[Figure | None]]:
    """Per page, its figure crops as Figures with ids numbered across the document (`img-0.jpeg`, ...); None for a
    crop left out: smaller than `min_size` pixels in width or height, or past `limit` figures."""
    numbered: list[list[Figure | None]] = []
    count = 0
    for page in pages:
        figures: list[Figure | None] = []
        for crop in page.crops:
            keep = crop is not None and min(crop[1].size) >= min_size and (limit is None or count < limit)
            figures.append(Figure(f"img-{count}.jpeg", *crop) if keep and crop is not None else None)
            count += keep
        numbered.append(figures)
    return numbered


def page_markdown(page: PageText, figures: list[Figure | None], link: Callable[[Figure], str]) -> str:
    """The page's Markdown with each figure link written by `link` (a figure left out loses its link), and runs of
    blank lines made one."""

    def replace(match: re.Match[str]) -> str:
        k = int(match.group(1))
        figure = figures[k] if k < len(figures) else None
        return link(figure) if figure is not None else ""

    return _BLANK_LINES.sub("\n\n", _FIGURE_LINK.sub(replace, page.text)).strip()


def jpeg_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def reference_link(figure: Figure) -> str:
    """The way the Mistral OCR API's Markdown names a figure: `![img-0.jpeg](img-0.jpeg)`."""
    return f"![{figure.id}]({figure.id})"


def embedded_link(figure: Figure) -> str:
    return f"![{figure.id}]({jpeg_data_url(figure.image)})"


# ------------------------------------------------------------------------------------------------ the routes' entry


async def read_document(service: ModelService, content: bytes | Path, kind: str, name: str, mode: Mode,
                        pool: Executor, ticket: Ticket | None = None, receive: Receive | None = None,
                        wanted: list[int] | None = None, param: str = "pages",
                        extra: Callable[[Engine, PagedDocument], Awaitable[Any]] | None = None
                        ) -> tuple[PagedDocument, list[PageText], Any]:
    """A document's pages read by the model, refused before any work when the model is not ready (503), the queue
    is full (429) or the document is beyond the limits (400). `extra(engine, paged)`: more work on the opened
    document, run alongside the pages (its result is returned third)."""
    engine = service.ready_engine()
    assert engine.core is not None
    if engine.core.full():
        raise service.queue_full()
    settings = service.settings
    loop = asyncio.get_running_loop()
    paged = await loop.run_in_executor(pool, open_pages, content, kind, name, wanted, mode, settings.limits,
                                       settings.max_document_pages, param)
    params = SamplingOptions().resolve(settings.max_new_tokens)
    work = PageWork(engine, mode, settings.family.prompts["markdown"], params, settings.limits, ticket)
    try:
        pages, more = await extract_pages(work, paged, pool, settings.max_queue, receive,
                                          extra(engine, paged) if extra is not None else None)
    except (QueueFullError, LedgerFull):
        raise service.queue_full() from None
    seconds = time.monotonic() - work.started
    level = logging.INFO if len(pages) >= PROGRESS_PAGES else logging.DEBUG
    log.log(level, "%s: %d page(s) read in %.1f s", paged.name, len(pages), seconds)
    return paged, pages, more
