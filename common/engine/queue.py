"""The order requests wait in, independent of how they are served (one at a time today, batched later).

Interactive requests (with images: the user is watching) go before background ones (text-only: titles, tags,
follow-up suggestions), first come first served within a class; a background request that has waited
`promote_after_s` counts as interactive, so it is never starved. A request whose client left is removed at
once, freeing its slot. The wait estimate (for Retry-After) adds up the measured service time of each waiting
request's class and what the running ones still need.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFullError(Exception):
    pass


@dataclass
class _Entry(Generic[T]):
    item: T
    background: bool
    seq: int
    enqueued_at: float
    nbytes: int = 0


@dataclass
class _ServiceTimes:
    """Moving average of service seconds per class."""

    seconds: dict[bool, float] = field(default_factory=lambda: {False: 5.0, True: 2.0})

    def record(self, background: bool, seconds: float) -> None:
        self.seconds[background] = 0.7 * self.seconds[background] + 0.3 * seconds


class RequestQueue(Generic[T]):
    """Bounded by count and by the bytes the waiting requests hold. Thread-safe."""

    def __init__(
        self,
        max_size: int,
        max_bytes: int | None = None,
        promote_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_size, self.max_bytes, self.promote_after_s, self.clock = max_size, max_bytes, promote_after_s, clock
        self._entries: list[_Entry[T]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._service = _ServiceTimes()
        self._running: dict[int, tuple[bool, float]] = {}  # by id() of the request
        self.concurrency = 1  # requests served at once (the generation loop's batch)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def full(self, nbytes: int = 0) -> bool:
        with self._lock:
            return self._full(nbytes)

    def _full(self, nbytes: int) -> bool:
        if len(self._entries) >= self.max_size:
            return True
        return self.max_bytes is not None and bool(self._entries) and self.nbytes + nbytes > self.max_bytes

    def push(self, item: T, *, background: bool = False, nbytes: int = 0) -> None:
        with self._lock:
            if self._full(nbytes):
                raise QueueFullError()
            self._entries.append(_Entry(item, background, next(self._seq), self.clock(), nbytes))

    def _rank(self, entry: _Entry[T], now: float) -> tuple[int, int]:
        waiting_long = now - entry.enqueued_at >= self.promote_after_s
        return (1 if entry.background and not waiting_long else 0, entry.seq)

    def pop(self) -> T | None:
        """The next request to serve (None when empty); it counts as running until `done`."""
        with self._lock:
            if not self._entries:
                return None
            now = self.clock()
            entry = min(self._entries, key=lambda e: self._rank(e, now))
            self._entries.remove(entry)
            self._running[id(entry.item)] = (entry.background, now)
            return entry.item

    def remove(self, item: T) -> bool:
        """Takes a waiting request out (its client left); False if it is not waiting."""
        with self._lock:
            for entry in self._entries:
                if entry.item is item:
                    self._entries.remove(entry)
                    return True
            return False

    def clear(self) -> list[T]:
        with self._lock:
            items = [e.item for e in self._entries]
            self._entries.clear()
            return items

    def done(self, item: T) -> None:
        """A popped request finished: its service time feeds the wait estimate."""
        with self._lock:
            started = self._running.pop(id(item), None)
            if started is not None:
                self._service.record(started[0], self.clock() - started[1])

    def wait_estimate_s(self) -> float:
        """Seconds until a request queued now would start: the running requests' rest plus every waiting one,
        shared among the `concurrency` requests served at once."""
        with self._lock:
            now = self.clock()
            seconds = self._service.seconds
            running = sum(max(seconds[bg] - (now - t0), 0.0) for bg, t0 in self._running.values())
            work = running + sum(seconds[e.background] for e in self._entries)
            return work / max(1, self.concurrency)
