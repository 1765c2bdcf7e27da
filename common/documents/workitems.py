"""Work items: the images and pages named by a batch's inputs, and their preparation ahead of generation.

Files that are readable by name but broken inside (corrupt image, encrypted PDF, more pages than --max-pages)
become failing items so a batch goes on without them; missing or unsupported inputs are an InputError. Page
counts are bounded before the items are made (`max_pages`: a 590-byte PDF may claim a million pages), stdin is
read with a cap, and every item records where it came from (`origin`: path, page, size and time, or the hash of
stdin) so that a finished output is reused only for the same source. Two items never share an output name.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import time
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image

from common.documents.document import (
    DEFAULT_DPI,
    IMAGE_EXTENSIONS,
    PDF_EXTENSION,
    Document,
    kind_of_bytes,
    mode_pixel_budget,
    open_document,
    path_kind,
)
from common.errors import DsocrError, InputError
from common.model.modes import Mode

log = logging.getLogger("dsocr")

DEFAULT_MAX_PAGES = 10_000  # pages of one document (--max-pages)
MAX_STDIN_BYTES = 512 << 20  # input '-': the largest document read from stdin

PageRanges = list[tuple[int, int | None]]


@dataclass
class WorkItem:
    """One image or page to OCR."""

    source: str  # what the user named: a path, "-" for stdin, "" for a text-only prompt
    kind: str  # "image", "pdf" or "text"
    name: str  # output path stem relative to -o DIR (posix), e.g. "sub/report_page003"
    page: int | None = None  # 1-based page of a PDF / frame of a multi-page TIFF
    path: Path | None = None
    data: bytes | None = None  # stdin contents
    group: str | None = None  # combined-document stem (PDFNAME) for multi-page sources
    group_pages: int = 0  # how many items the group has in this run
    error: str | None = None  # known to fail before preparing (e.g. an encrypted PDF)
    # Where it came from, as recorded in NAME.json: {"path", "page", "size", "mtime_ns"} of a file,
    # {"path": "-", "page", "sha256"} of stdin; None for a text-only prompt.
    origin: dict[str, Any] | None = None

    @property
    def short_label(self) -> str:
        """File name and page, for the progress bar."""
        name = Path(self.source).name if self.source not in ("", "-") else self.label
        return f"{name} p.{self.page}" if self.page is not None and name != self.label else name

    @property
    def label(self) -> str:
        base = "<stdin>" if self.source == "-" else (self.source or "<text prompt>")
        return f"{base} p.{self.page}" if self.page is not None else base


def parse_page_ranges(text: str) -> PageRanges:
    """'1-3,7,10-' -> [(1, 3), (7, 7), (10, None)]; InputError on anything else."""
    ranges: PageRanges = []
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d{1,18})(?:(-)(\d{0,18}))?", part)
        if not m:
            raise InputError(f"bad --pages {text!r}: use page numbers and ranges like 1-3,7 or 5-", param="pages")
        first = int(m.group(1))
        last: int | None = first if not m.group(2) else (int(m.group(3)) if m.group(3) else None)
        if first < 1 or (last is not None and last < first):
            raise InputError(f"bad --pages {text!r}: pages count from 1 and ranges go upwards", param="pages")
        ranges.append((first, last))
    return ranges


def select_pages(ranges: PageRanges | None, n_pages: int, source: str, strict: bool) -> list[int]:
    """The selected pages that exist, in order; each range is clamped to the page count before it is expanded."""
    if ranges is None:
        return list(range(1, n_pages + 1))
    beyond = [last for first, last in ranges if max(first, last or 0) > n_pages]
    if beyond and strict:
        first_beyond = min(max(first, n_pages + 1) for first, last in ranges if max(first, last or 0) > n_pages)
        raise InputError(f"{source} has {n_pages} page(s); --pages asks for page {first_beyond}", param="pages")
    wanted: set[int] = set()
    for first, last in ranges:
        wanted.update(range(first, min(last or n_pages, n_pages) + 1))
    return sorted(wanted)


def item_identity(item: WorkItem) -> dict[str, Any]:
    """What NAME.json records of the item's source, and what a stored record must match to be reused."""
    return item.origin if item.origin is not None else {"path": item.source, "page": item.page}


def read_stdin(stream: IO[bytes], max_bytes: int | None = None) -> bytes:
    """stdin's document, read with a cap (`dsocr - < /dev/zero` never ends; default MAX_STDIN_BYTES): InputError
    beyond `max_bytes`, after reading at most `max_bytes` + 1 bytes."""
    max_bytes = MAX_STDIN_BYTES if max_bytes is None else max_bytes
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes:
        chunk = stream.read(min(1 << 20, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:
        raise InputError(f"stdin (input '-') holds more than {max_bytes >> 20} MiB; save the document to a file "
                         "and name it instead")
    return b"".join(chunks)


def expand_inputs(
    inputs: Sequence[str],
    pages: PageRanges | None,
    stdin: IO[bytes] | None = None,
    exclude: Path | None = None,
    max_pages: int = DEFAULT_MAX_PAGES,
    max_stdin_bytes: int | None = None,
) -> list[WorkItem]:
    """The inputs as work items, in order. Folder scans leave out `exclude` (the -o folder: its crops). A document
    of more than `max_pages` pages is refused before its items are made (a failing item in a folder; an
    InputError when named)."""
    excluded = exclude.resolve() if exclude is not None else None
    items: list[WorkItem] = []
    for raw in inputs:
        if raw == "-":
            data = read_stdin(stdin or _stdin(), max_stdin_bytes)
            if not data:
                raise InputError("no data on stdin (input '-')")
            items += _document_items("-", kind_of_bytes(data), "stdin", None, data, pages, strict=True,
                                     max_pages=max_pages)
            continue
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputError(f"input not found: {raw}")
        if path.is_dir():
            found = sorted(
                (
                    f
                    for f in path.rglob("*")
                    if f.is_file()
                    and f.suffix.lower() in IMAGE_EXTENSIONS | {PDF_EXTENSION}
                    and not (excluded is not None and f.resolve().is_relative_to(excluded))
                ),
                key=lambda f: f.relative_to(path).as_posix(),
            )
            if not found:
                raise InputError(f"no images or PDFs in folder {raw}")
            for f in found:
                kind = "pdf" if f.suffix.lower() == PDF_EXTENSION else "image"
                items += _document_items(str(f), kind, f.relative_to(path).with_suffix("").as_posix(), f, None,
                                         pages, strict=False, max_pages=max_pages)
            continue
        if not os.access(path, os.R_OK):
            raise InputError(f"cannot read {raw}: permission denied")
        try:
            kind = path_kind(path)
        except OSError as exc:
            raise InputError(f"cannot read {raw}: {exc.strerror or exc}") from None
        if kind is None:
            raise InputError(f"unsupported input format: {raw} (expected PNG, JPEG, WebP, TIFF, BMP, GIF or PDF)")
        items += _document_items(raw, kind, path.stem, path, None, pages, strict=True, max_pages=max_pages)
    _disambiguate_names(items)
    return items


def _stdin() -> IO[bytes]:
    import sys

    return sys.stdin.buffer


def _document_items(
    source: str,
    kind: str,
    stem: str,
    path: Path | None,
    data: bytes | None,
    pages: PageRanges | None,
    strict: bool,
    max_pages: int = DEFAULT_MAX_PAGES,
) -> list[WorkItem]:
    content: Path | bytes = path if path is not None else data  # type: ignore[assignment]
    origin = _origin(path, data)
    try:
        document = open_document(content, kind, source, max_pages=max_pages)
    except DsocrError as exc:
        return [WorkItem(source, kind, stem, path=path, data=data, error=str(exc), origin=origin)]
    n_pages = document.pages
    if n_pages > max_pages:
        count = f"more than {max_pages:,}" if document.capped else f"{n_pages:,}"
        message = f"{source} has {count} pages; at most {max_pages:,} are accepted per document (--max-pages)"
        if strict:
            raise InputError(message, param="max_pages")
        return [WorkItem(source, kind, stem, path=path, data=data, error=message, origin=origin)]
    if kind == "image" and n_pages == 1:
        if pages is not None and strict and not select_pages(pages, 1, source, strict=False):
            raise InputError(f"{source} has 1 page; --pages selects none of it", param="pages")
        return [WorkItem(source, kind, stem, path=path, data=data, origin=origin)]
    selected = select_pages(pages, n_pages, source, strict)
    if not selected:
        log.warning("%s: --pages selects none of its %d pages; skipped", source, n_pages)
        return []
    width = max(3, len(str(n_pages)))
    return [
        WorkItem(source, kind, f"{stem}_page{p:0{width}d}", page=p, path=path, data=data, group=stem,
                 group_pages=len(selected), origin=dict(origin, page=p))
        for p in selected
    ]


def _origin(path: Path | None, data: bytes | None) -> dict[str, Any]:
    """The source's identity for resuming: a file by absolute path, size and modification time; stdin by hash."""
    if path is None:
        return {"path": "-", "page": None, "sha256": hashlib.sha256(data or b"").hexdigest()}
    try:
        stat = path.stat()
    except OSError:
        return {"path": str(path.absolute()), "page": None, "size": None, "mtime_ns": None}
    return {"path": str(path.resolve()), "page": None, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _disambiguate_names(items: list[WorkItem]) -> None:
    """report.png and report.pdf in one folder would both write report.md: use report_png / report_pdf."""
    sources_by_stem: dict[str, set[str]] = {}
    for item in items:
        sources_by_stem.setdefault(item.group or item.name, set()).add(item.source)
    for item in items:
        stem = item.group or item.name
        if len(sources_by_stem[stem]) < 2 or item.path is None:
            continue
        new_stem = f"{stem}_{item.path.suffix.lstrip('.').lower() or 'file'}"
        item.name = new_stem + item.name[len(stem) :]
        if item.group:
            item.group = new_stem
    seen: dict[tuple[str, str], int] = {}
    for item in items:  # the same file named twice: keep both outputs apart
        count = seen.get((item.source, item.name), 0)
        seen[(item.source, item.name)] = count + 1
        if count:
            item.name = f"{item.name}_{count + 1}"
            if item.group:
                item.group = f"{item.group}_{count + 1}"
    _separate_outputs(items)


def _separate_outputs(items: list[WorkItem]) -> None:
    """Every output stem (NAME of NAME.md / NAME.json / NAME_images, PDFNAME of the combined PDFNAME.md) belongs
    to one source: `x_page001.jpg` and page 1 of `x.pdf` would both write x_page001.md. A file's own stem is
    claimed first (so that adding a file never renames another file's outputs); a document whose page names are
    taken is renamed (its extension added, then a number), before any work."""
    units: dict[tuple[str, str], list[WorkItem]] = {}  # a multi-page document's items, or a single item
    for index, item in enumerate(items):
        units.setdefault(("group", item.group) if item.group else ("item", str(index)), []).append(item)
    taken: set[str] = set()
    for members in units.values():  # own stems: an image's NAME, a document's PDFNAME
        stem = members[0].group or members[0].name
        if stem in taken:
            _rename(members, lambda added, stem=stem: {stem + added}, taken)
        taken.add(members[0].group or members[0].name)
    for members in units.values():  # derived names: a document's pages
        if not members[0].group:
            continue
        stem = members[0].group

        def claims(added: str, members: list[WorkItem] = members, stem: str = stem) -> set[str]:
            return {_renamed(item, stem, added) for item in members} | ({stem + added} if added else set())

        if claims("") & taken:
            taken.discard(stem)
            _rename(members, claims, taken)
        taken |= {item.name for item in members} | {members[0].group}


def _renamed(item: WorkItem, stem: str, added: str) -> str:
    return stem + added + item.name[len(stem):] if item.name.startswith(stem) else item.name + added


def _rename(members: list[WorkItem], claims: Any, taken: set[str]) -> None:
    """Adds `_EXT` (then `_2`, `_3` ...) to the stem of a document's or image's names until they are free."""
    first = members[0]
    stem = first.group or first.name
    suffix = first.path.suffix.lstrip(".").lower() if first.path is not None else ""
    attempt = 2
    added = f"_{suffix}" if suffix else "_2"
    while claims(added) & taken:
        attempt += 1
        added = f"_{attempt}"
    log.warning("%s: its outputs would take the names of another input's; written as %s", first.source,
                stem + added)
    for item in members:
        item.name = _renamed(item, stem, added)
        if item.group:
            item.group = stem + added


def load_item_image(item: WorkItem, dpi: int, mode: Mode) -> Image.Image | None:
    """The item's page as an RGB image (None for a text-only item); a PDF page at most the mode's budget."""
    if item.error:
        raise InputError(item.error)
    if item.kind == "text":
        return None
    content: Path | bytes = item.path if item.path is not None else item.data  # type: ignore[assignment]
    document = Document(item.kind, content, pages=item.page or 1, name=item.source)
    if item.path is None and item.origin is not None and "sha256" in item.origin:
        document._key = "bytes:" + item.origin["sha256"]  # stdin is hashed once, not once per page
    return document.render(item.page or 1, dpi, mode_pixel_budget(mode))


@dataclass
class Prepared:
    item: WorkItem
    image: Image.Image | None = None
    inputs: Any = None  # common.engine.backend.PreparedInputs
    prepare_s: float = 0.0
    error: BaseException | None = None


def prepare_item(engine: Any, item: WorkItem, prompt: str, mode: Mode, dpi: int = DEFAULT_DPI) -> Prepared:
    t0 = time.perf_counter()
    try:
        image = load_item_image(item, dpi, mode)
        inputs = engine.prepare(prompt, [image] if image is not None else [], mode)
    except Exception as exc:  # reported per item; the batch goes on
        return Prepared(item, error=exc, prepare_s=time.perf_counter() - t0)
    return Prepared(item, image, inputs, time.perf_counter() - t0)


def prepared_items(
    engine: Any, items: list[WorkItem], prompt: str, mode: Mode, dpi: int, ahead: int
) -> Generator[Prepared, None, None]:
    """The items prepared, in order. With `ahead` > 0 a worker thread prepares up to `ahead` items in advance
    while the caller generates; closing the generator (or Ctrl-C in the caller) drops what has not started."""
    if ahead <= 0:
        for item in items:
            yield prepare_item(engine, item, prompt, mode, dpi)
        return
    pending: collections.deque[Future[Prepared]] = collections.deque()
    upcoming = iter(items)
    pool = ThreadPoolExecutor(1, thread_name_prefix="dsocr-prepare")
    try:
        while True:
            while len(pending) < ahead and (item := next(upcoming, None)) is not None:
                pending.append(pool.submit(prepare_item, engine, item, prompt, mode, dpi))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
