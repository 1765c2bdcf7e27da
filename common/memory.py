"""Process memory: resident size, reusing freed heap across requests and handing it back after large transient
buffers, and the garbage collector paused while a model loads.

glibc keeps freed memory of big requests in its arenas; `malloc_trim` returns what it can. Elsewhere (macOS,
musl) trimming is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (Linux), for calls Python does not wrap; None elsewhere. Its calls
    release the GIL."""
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
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters (malloc.h)


def keep_freed_heap(trim_threshold: int = 1 << 30) -> bool:
    """Lets glibc reuse freed memory for the next request instead of handing it back at every free.

    By default a block from 128 KiB up is mapped fresh and unmapped when freed, and a heap top past a few MiB
    is trimmed, so every page takes page faults on new memory for its activation buffers (hundreds of MiB per
    page in the vision tower, over a GiB in float32), the first page most. Here blocks come from the heap
    (none is mapped on its own, but one too large for a thread's arena) and the heap top is trimmed only past
    `trim_threshold`, so those buffers are reused. `trim_heap` still returns free heap memory on purpose (after
    a load, and the server after large requests).

    All threads share one arena: `malloc_trim` gives back the free top of the main arena only, so the top of a
    thread's arena (a 40 MB request body decoded on a server thread) would stay resident for good. Called before
    the program starts threads, so that none has an arena of its own yet. True where it took effect.
    """
    libc = glibc()
    if libc is None:
        return False
    return (bool(libc.mallopt(_M_ARENA_MAX, 1)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)))


CGROUP_ROOT = Path("/sys/fs/cgroup")


def memory_limit_bytes(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The memory this process may use: the machine's, or less where a cgroup (a container's or a pod's memory
    limit) caps it, so that defaults sized from it (the KV cache) do not get the process killed."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    for limit_file in (cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"):  # v2, v1
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:  # "max" (v2) or a huge number (v1) when unlimited
            return int(text)
    return total


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
