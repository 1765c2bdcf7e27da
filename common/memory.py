"""Process memory: resident size, reusing freed heap across requests and handing it back after large transient
buffers, faulting in during a load the heap a model's pages will need, and the garbage collector paused while a
model loads.

glibc keeps freed memory of big requests in its arenas; `malloc_trim` returns what it can. Elsewhere (macOS,
musl) trimming is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> bool:
    """Returns free heap memory to the system where the allocator allows; True if it did."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_keeping_freed_heap = False


def keep_freed_heap(trim_threshold: int = 1 << 30) -> bool:
    """Lets glibc reuse freed memory for the next request instead of handing it back at every free.

    By default a block from 128 KiB up is mapped fresh and unmapped when freed, and a heap top past a few MiB
    is trimmed, so every page takes page faults on new memory for its activation buffers (hundreds of MiB per
    page in the vision tower, over a GiB in float32), the first page most. Here blocks come from the heap
    (none is mapped on its own, but one too large for a thread's arena) and the heap top is trimmed only past
    `trim_threshold`, so those buffers are reused. `trim_heap` still returns free heap memory on purpose (after
    a load, and the server after large requests). True where it took effect.
    """
    global _keeping_freed_heap
    libc = _libc()
    if libc is None:
        return False
    _keeping_freed_heap = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _keeping_freed_heap


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]


def heap_usage() -> tuple[int, int]:
    """(bytes the heap spans, bytes allocated in it) now, over all of glibc's arenas; with `keep_freed_heap` the
    span is the most this process has needed at once. (0, 0) where glibc (2.33+) cannot tell."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0, 0
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.arena), int(info.uordblks)


_CHUNK = 16 << 20


def prefault_heap(nbytes: int) -> threading.Thread | None:
    """Grows the heap by about `nbytes` of memory already faulted in, the faulting done on a background thread.

    Blocks are taken from the heap on the calling thread (the one whose tensors will reuse them) and touched and
    freed on the new one, in C calls that release the GIL, so the page faults run on a spare core while the
    caller goes on (a load parsing its tokenizer, a page being decoded). Freed, the blocks stay in the heap
    for the caller's next allocations. Join the thread before heavy work on all cores. None where there is
    nothing to do, or the heap would not keep the blocks (no glibc, or `keep_freed_heap` not in effect).
    """
    libc = _libc()
    if libc is None or not _keeping_freed_heap or nbytes < _CHUNK:
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(_CHUNK) for _ in range(nbytes // _CHUNK)]

    def touch_and_free() -> None:
        for block in blocks:
            if block:
                ctypes.memset(block, 0, _CHUNK)
                libc.free(block)

    thread = threading.Thread(target=touch_and_free, name="dsocr-prefault-heap")
    thread.start()
    return thread


class HeapWarmup:
    """The heap a process's first page needs beyond the loaded model, recorded in a small file next to the model,
    so that the next process faults that much in while it loads instead of during its first page.

    Where fresh memory is slow to fault in (virtual machines that hand freed memory back to the host), this is
    a large part of what a first page costs more than the next one. Later pages reuse that memory (they grow
    the heap a little more, as it fragments). The record keeps the largest first-page need seen.
    """

    def __init__(self, record: Path, limit: int = 2 << 30) -> None:
        self.record = record
        self._recorded = self._read()
        self._thread = prefault_heap(min(self._recorded, limit))
        self._loaded_bytes: int | None = None  # allocated in the heap when the first page began
        self._noted = False

    def _read(self) -> int:
        try:
            value = json.loads(self.record.read_text(encoding="utf-8")).get("page_heap_bytes", 0)
        except (OSError, ValueError, AttributeError):
            return 0
        return value if isinstance(value, int) and value > 0 else 0

    def ready(self) -> None:
        """Before a page's work: waits for the faulting if it still runs."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._loaded_bytes is None:
            self._loaded_bytes = heap_usage()[1]

    def note(self) -> None:
        """After a page: the first time, records what the heap holds beyond the loaded model if well past what
        the file says."""
        span = heap_usage()[0]
        if self._noted or self._loaded_bytes is None or not span:
            return
        self._noted = True
        need = span - self._loaded_bytes
        if need <= self._recorded + max(self._recorded // 10, _CHUNK):
            return
        self._recorded = need
        temporary = self.record.with_name(f"{self.record.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps({"page_heap_bytes": need}), encoding="utf-8")
            os.replace(temporary, self.record)
        except OSError as exc:
            log.debug("cannot record the heap pages need in %s: %s", self.record, exc)
            temporary.unlink(missing_ok=True)


def rss_bytes() -> int:
    """Resident set size of this process (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (a model load).

    A load creates thousands of modules, parameters and header entries, so automatic collections run again
    and again, and each one rescans every object alive, torch's own included: a large part of a load's time
    for nothing, since what a load creates stays alive.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
