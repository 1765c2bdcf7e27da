"""PDF pages rendered in worker processes, bounded in time and memory: a runaway page is killed, not the caller.

pdfium parses a page's drawing operators when the page is loaded and draws each one when it renders: a 50 KB PDF
can hold millions of flate-compressed operators, minutes of work and gigabytes of memory, which a process never
gets back. So pages are rendered by a small pool of worker processes (`RenderLimits.workers`, default 2), each
under an address-space limit (RLIMIT_AS, `memory_gib`) and a deadline per page (`page_timeout_s`): a worker that
runs past its deadline is killed and replaced, and the page is refused with an ImageError; one that runs out of
memory (pdfium aborts) is replaced the same way. Pages of different requests render in parallel, in no process's
lock. Opening a PDF to count and size its pages stays in the caller's process (`common.documents.document`):
pdfium reads only the document's header and page tree for that, not the pages' content.

The workers are fresh interpreters (`subprocess`, fork + exec: the same as multiprocessing's `spawn`, safe in a
process with threads) that import only this module, PIL and pypdfium2: multiprocessing's `spawn` would import
the caller's `__main__` (the server, with its web framework) into each worker. Requests and replies are framed
bytes (a length, a JSON header, then the PDF or the page's raw RGB pixels): nothing a worker sends is unpickled,
so a worker compromised by a hostile PDF cannot run code in the caller. Each worker keeps its last document open,
so the pages of one document are sent once per worker.

The pool is created on first use, shared by the whole process (the server's prepare threads, the CLI's prepare
thread, a Ray actor), and closed at exit (`close_render_pool`, also from the server's shutdown). Its limits come
from `configure_render_pool`, else the variables DSOCR_RENDER_WORKERS, DSOCR_RENDER_TIMEOUT (seconds) and
DSOCR_RENDER_MEMORY_GB, else the defaults.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from common.errors import ImageError

log = logging.getLogger("dsocr")

DEFAULT_RENDER_WORKERS = 2
DEFAULT_RENDER_MEMORY_GIB = 4.0
DEFAULT_RENDER_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 60.0  # a fresh worker imports pypdfium2 and PIL: well under a second on a quiet machine
RENDER_NICENESS = 15  # a renderer yields the cores to the server's event loop and the engine whenever they want them
_MAX_HEADER_BYTES = 1 << 16
_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `common`, for the worker's sys.path


@dataclass(frozen=True)
class RenderLimits:
    """How PDF pages are rendered: by `workers` processes at once, each within `memory_gib` of address space and
    `page_timeout_s` seconds per page."""

    workers: int = DEFAULT_RENDER_WORKERS
    memory_gib: float = DEFAULT_RENDER_MEMORY_GIB
    page_timeout_s: float = DEFAULT_RENDER_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("render workers must be at least 1")
        if not (self.memory_gib > 0 and self.page_timeout_s > 0):
            raise ValueError("the render memory and timeout must be positive")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> RenderLimits:
        """The limits from DSOCR_RENDER_WORKERS / DSOCR_RENDER_TIMEOUT / DSOCR_RENDER_MEMORY_GB (unset: defaults)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field, kind in (("DSOCR_RENDER_WORKERS", "workers", int),
                                  ("DSOCR_RENDER_TIMEOUT", "page_timeout_s", float),
                                  ("DSOCR_RENDER_MEMORY_GB", "memory_gib", float)):
            raw = environ.get(name, "").strip()
            if not raw:
                continue
            try:
                value = kind(raw)
            except ValueError:
                raise ImageError(f"${name}: not a number: {raw!r}") from None
            if not (value > 0 and math.isfinite(value)):
                raise ImageError(f"${name}: must be positive, got {raw!r}")
            values[field] = value
        return cls(**values)


def pdf_render_scale(width_pt: float, height_pt: float, dpi: int, pixel_budget: int | None) -> float:
    """Points -> pixels: `dpi`, lowered so the page holds at most `pixel_budget` pixels."""
    scale = dpi / 72.0
    area_pt = max(width_pt * height_pt, 1e-6)
    if pixel_budget is not None and area_pt * scale * scale > pixel_budget:
        scale = math.sqrt(pixel_budget / area_pt)
    return scale


# ------------------------------------------------------------------------------------------------ framing


def _frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    head = json.dumps(dict(header, payload=len(payload))).encode()
    return [struct.pack(">I", len(head)), head, payload]


def _write_all(stream: BinaryIO, parts: list[bytes | memoryview]) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            written = stream.write(view)
            view = view[written or 0 :]
    stream.flush()


class _Overrun(Exception):
    """The worker did not answer before the deadline."""


class _Gone(Exception):
    """The worker's output ended (it died) or broke the protocol."""


def _read_exact(stream: BinaryIO, size: int, deadline: float | None) -> bytearray:
    """`size` bytes from an unbuffered pipe, waiting at most until `deadline` (monotonic; None: no limit)."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        try:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
                    raise _Overrun
            count = stream.readinto(view[got:])  # type: ignore[attr-defined]
        except (OSError, ValueError) as exc:  # the pipe was closed under us (the pool is closing)
            raise _Gone(f"the renderer's output closed ({exc})") from None
        if not count:
            raise _Gone("the renderer's output ended")
        got += count
    return buffer


def _read_frame(stream: BinaryIO, deadline: float | None, max_payload: int) -> tuple[dict[str, Any], bytearray]:
    (length,) = struct.unpack(">I", _read_exact(stream, 4, deadline))
    if length > _MAX_HEADER_BYTES:
        raise _Gone("the renderer sent an oversized header")
    try:
        header = json.loads(bytes(_read_exact(stream, length, deadline)))
    except ValueError:
        raise _Gone("the renderer sent a malformed header") from None
    if not isinstance(header, dict):
        raise _Gone("the renderer sent a malformed header")
    size = header.get("payload", 0)
    if not isinstance(size, int) or not 0 <= size <= max_payload:
        raise _Gone("the renderer announced a payload out of bounds")
    return header, _read_exact(stream, size, deadline) if size else bytearray()


# ------------------------------------------------------------------------------------------------ worker side


def _worker_main(memory_bytes: int) -> None:
    """A worker's loop: one request at a time from stdin, one reply to stdout, until stdin ends."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):  # no RLIMIT_AS here (Windows; macOS may refuse): the deadline stays
        pass
    with contextlib.suppress(AttributeError, OSError):  # a runaway page yields the cores to the server's own threads
        os.nice(RENDER_NICENESS)
    parent = os.getppid()

    def orphan_watch() -> None:  # the caller died (even mid-page): stop rather than render for nobody
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=orphan_watch, daemon=True).start()
    source = open(os.dup(0), "rb", buffering=0)  # noqa: SIM115 - for the life of the process
    sink = open(os.dup(1), "wb", buffering=0)  # noqa: SIM115
    os.dup2(2, 1)  # nothing but frames on the pipe, whatever pdfium or Python print
    try:
        import pypdfium2 as pdfium
    except ImportError as exc:
        _write_all(sink, _frame({"error": f"the PDF renderer cannot start: {exc}"}))
        return
    _write_all(sink, _frame({"ready": True}))
    held: tuple[str, Any, Any] | None = None  # (document key, PdfDocument, its bytes)
    while True:
        try:
            request, payload = _read_frame(source, None, 1 << 40)
        except (_Gone, struct.error):
            return
        try:
            if held is None or held[0] != request["doc"]:
                if held is not None:
                    held[1].close()
                    held = None
                content: Any = bytes(payload) if payload else request["path"]
                held = (request["doc"], pdfium.PdfDocument(content), content)
            reply, pixels = _render_page(pdfium, held[1], request)
        except MemoryError:
            _write_all(sink, _frame({"error": "memory", "memory": True}))
            os._exit(3)  # its heap is not worth keeping
        except pdfium.PdfiumError as exc:
            reply, pixels = {"error": f"cannot render page {request.get('page', 0) + 1}: {exc}"}, b""
        except Exception as exc:  # a page that fails is the page's error; the worker goes on
            reply, pixels = {"error": f"cannot render page {request.get('page', 0) + 1}: "
                                      f"{type(exc).__name__}: {exc}"}, b""
        reply["doc"] = held[0] if held is not None else None
        try:
            _write_all(sink, _frame(reply, pixels))
        except OSError:
            return
        del pixels


def _render_page(pdfium: Any, pdf: Any, request: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    index, dpi, budget, max_pixels = request["page"], request["dpi"], request["budget"], request["max_pixels"]
    page = pdf[index]
    try:
        width_pt, height_pt = page.get_size()
        scale = pdf_render_scale(width_pt, height_pt, dpi, budget)
        if width_pt * height_pt * scale * scale > max_pixels:
            return {"error": f"page {index + 1} would render to {int(width_pt * scale)}x{int(height_pt * scale)} "
                             f"pixels at {dpi} dpi, above the limit; lower the dpi"}, b""
        image = page.render(scale=scale).to_pil().convert("RGB")
    finally:
        page.close()
    pixels = image.tobytes()
    return {"width": image.width, "height": image.height}, pixels


# ------------------------------------------------------------------------------------------------ caller side

_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from common.documents.render import _worker_main; _worker_main(int(sys.argv[2]))")


class _Worker:
    """One worker process and what it holds: started at once, ready after its first frame."""

    def __init__(self, memory_bytes: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(_ROOT), str(memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, close_fds=True,
        )
        self.ready = False
        self.doc: str | None = None  # key of the document it holds open

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            header, _ = _read_frame(self.proc.stdout, time.monotonic() + STARTUP_TIMEOUT_S, 0)  # type: ignore[arg-type]
        except (_Overrun, _Gone, struct.error) as exc:
            raise ImageError(f"the PDF renderer did not start ({type(exc).__name__})") from None
        if not header.get("ready"):
            raise ImageError(str(header.get("error", "the PDF renderer did not start"))[:500])
        self.ready = True

    def render(self, key: str, content: Path | bytes, page: int, dpi: int, budget: int | None, max_pixels: int,
               timeout_s: float) -> Image.Image:
        request = {"doc": key, "page": page - 1, "dpi": dpi, "budget": budget, "max_pixels": max_pixels,
                   "path": str(content.absolute()) if isinstance(content, Path) else None}
        payload = content if isinstance(content, bytes) and self.doc != key else b""
        try:
            _write_all(self.proc.stdin, _frame(request, payload))  # type: ignore[arg-type]
        except OSError as exc:
            raise _Gone(f"the renderer's input closed ({exc})") from None
        self.doc = None  # until the worker says what it holds
        header, pixels = _read_frame(self.proc.stdout, time.monotonic() + timeout_s,  # type: ignore[arg-type]
                                     3 * max_pixels)
        self.doc = header.get("doc") if isinstance(header.get("doc"), str) else None
        if "error" in header:
            if header.get("memory"):
                raise _Gone("memory")
            raise ImageError(str(header["error"])[:1000])
        width, height = header.get("width"), header.get("height")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
                and width * height * 3 == len(pixels)):
            raise _Gone("the renderer sent a page of the wrong size")
        return Image.frombytes("RGB", (width, height), pixels)

    def kill(self) -> str:
        """Kills the process; how it ended, for the log."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            return "did not stop"
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"signal {signal.Signals(-code).name}"
        return f"exit code {code}"


class RenderPool:
    """At most `limits.workers` pages render at once, each in a worker process under the limits."""

    def __init__(self, limits: RenderLimits | None = None) -> None:
        self.limits = limits or RenderLimits()
        self._slots = threading.BoundedSemaphore(self.limits.workers)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False

    @property
    def memory_bytes(self) -> int:
        return int(self.limits.memory_gib * (1 << 30))

    def render(self, content: Path | bytes, page: int, dpi: int, pixel_budget: int | None, max_pixels: int,
               key: str | None = None) -> Image.Image:
        """Page `page` (1-based) of the PDF `content` as an RGB image; ImageError when it cannot be rendered
        within the limits (the worker that overran is killed and replaced)."""
        key = key or document_key(content)
        timeout = self.limits.page_timeout_s
        with self._slots:
            worker = self._take()
            try:
                worker.wait_ready()
            except BaseException:
                self._discard(worker)
                raise
            try:
                image = worker.render(key, content, page, dpi, pixel_budget, max_pixels, timeout)
            except ImageError:  # the page's own error, from a healthy worker: the worker goes on
                self._give(worker, keep=True)
                raise
            except _Overrun:
                self._discard(worker)
                raise ImageError(f"page {page} took longer than {timeout:g} s to render; refused") from None
            except (_Gone, struct.error) as exc:
                how = self._discard(worker)
                log.warning("PDF renderer stopped on page %d (%s; %s)", page, exc, how)
                raise ImageError(f"page {page} needed more than {self.limits.memory_gib:g} GiB to render "
                                 "(or crashed the renderer); refused") from None
            except BaseException:  # Ctrl-C or a bug mid-page: the worker's state is unknown
                self._discard(worker)
                raise
            self._give(worker, keep=True)
            return image

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise ImageError("the PDF renderer is shut down")
            if self._idle:
                worker = self._idle.pop()
            else:
                worker = _Worker(self.memory_bytes)
                # Fill the pool as well, so the pages that follow find a worker that has started.
                while len(self._idle) + len(self._busy) + 1 < self.limits.workers:
                    self._idle.append(_Worker(self.memory_bytes))
            self._busy.add(worker)
            return worker

    def _give(self, worker: _Worker, keep: bool) -> None:
        with self._lock:
            self._busy.discard(worker)
            if keep and not self._closed:
                self._idle.append(worker)
                return
        worker.kill()

    def _discard(self, worker: _Worker) -> str:
        with self._lock:
            self._busy.discard(worker)
        return worker.kill()

    def close(self) -> None:
        """Kills every worker (a page still rendering fails); the pool refuses new pages."""
        with self._lock:
            self._closed = True
            workers = [*self._idle, *self._busy]
            self._idle.clear()
        for worker in workers:
            worker.kill()

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in (*self._idle, *self._busy)]


# ------------------------------------------------------------------------------------------------ the process's pool

_POOL: RenderPool | None = None
_POOL_LIMITS: RenderLimits | None = None
_POOL_LOCK = threading.Lock()
_AT_EXIT = False


def configure_render_pool(limits: RenderLimits | None) -> None:
    """The limits of this process's pool from now on (None: the DSOCR_RENDER_* variables, else the defaults); a
    running pool is closed and the next page starts a new one."""
    global _POOL_LIMITS
    with _POOL_LOCK:
        _POOL_LIMITS = limits
    close_render_pool()


def render_pool() -> RenderPool:
    """This process's pool, created on first use."""
    global _POOL, _AT_EXIT
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = RenderPool(_POOL_LIMITS or RenderLimits.from_environment())
            if not _AT_EXIT:
                atexit.register(close_render_pool)
                _AT_EXIT = True
        return _POOL


def close_render_pool() -> None:
    """Stops this process's workers (the server's shutdown, exit); a later page starts a new pool."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.close()


def document_key(content: Path | bytes) -> str:
    """Names a document's content for the worker that holds it open: a file by path, size and time, bytes by
    their hash (computed once per Document: `Document.key`)."""
    if isinstance(content, Path):
        try:
            stat = content.stat()
        except OSError as exc:
            raise ImageError(f"cannot read {content}: {exc.strerror or exc}") from None
        return f"path:{content.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return "bytes:" + hashlib.blake2b(content, digest_size=20).hexdigest()


def render_pdf_page(content: Path | bytes, page: int, dpi: int, pixel_budget: int | None, max_pixels: int,
                    key: str | None = None) -> Image.Image:
    """Page `page` (1-based) of a PDF, rendered in this process's pool (`key`: the content's `document_key`)."""
    return render_pool().render(content, page, dpi, pixel_budget, max_pixels, key)
