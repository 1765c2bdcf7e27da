"""Process memory: resident size, and handing freed heap back to the system after large transient buffers.

glibc keeps freed memory of big requests in its arenas; `malloc_trim` returns what it can. Elsewhere (macOS,
musl) trimming is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys


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


def rss_bytes() -> int:
    """Resident set size of this process (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
