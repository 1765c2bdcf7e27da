"""Which sequences run: one bounded waiting queue with priorities, the decode lanes, and the prompt being taken in.

Admission is here and only here: a request waits in one queue bounded by count and by the bytes its inputs hold
(what a waiting request keeps in memory). Interactive requests (priority 0) go before background ones (1),
first come first served within a class; a background request that has waited `promote_after_s` counts as
interactive, so it is never starved. A sequence leaves the queue when a lane is free: it takes its prompt in
(one `PrefillJob`, `prefill_chunk` positions per unit), then decodes in lane B of the batch [0, B). When a
sequence ends, the last lane moves into its place, so a decode step always runs the lanes [0, B).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from common.engine.requests import RequestHandle
from common.engine.sequence import BACKGROUND, INTERACTIVE, Sequence

# Prompt positions per prefill unit: bounds how long running sequences wait while a prompt joins.
PREFILL_CHUNK = {"cuda": 2048}
DEFAULT_PREFILL_CHUNK = 512


class QueueFullError(Exception):
    """The waiting queue is at its bound (count or bytes): try again later."""


class Scheduler:
    """The waiting queue (thread-safe: `add` and `remove` come from any thread) and the running lanes (the engine
    core's thread only)."""

    def __init__(
        self,
        max_batch: int,
        prefill_chunk: int,
        *,
        max_waiting: int | None = None,
        max_waiting_bytes: int | None = None,
        promote_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.max_waiting, self.max_waiting_bytes = max_waiting, max_waiting_bytes
        self.promote_after_s, self.clock = promote_after_s, clock
        self.decoding: list[Sequence] = []  # index = lane
        self.prefilling: Sequence | None = None
        self._waiting: list[tuple[Sequence, float]] = []  # (sequence, enqueued at)
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._service_s = {INTERACTIVE: 5.0, BACKGROUND: 2.0}  # moving average of seconds per request, by class
        self._started: dict[int, tuple[int, float]] = {}  # handle id -> (priority, left the queue at)

    # ---- the waiting queue (any thread) ---------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting_bytes(self) -> int:
        return sum(seq.nbytes for seq, _ in self._waiting)

    @property
    def running(self) -> int:
        return len(self.decoding) + (self.prefilling is not None)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self.decoding or self.prefilling)

    def full(self, nbytes: int = 0) -> bool:
        with self._lock:
            return self._full(nbytes)

    def _full(self, nbytes: int) -> bool:
        if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
            return True
        held = sum(seq.nbytes for seq, _ in self._waiting)
        return self.max_waiting_bytes is not None and bool(self._waiting) and held + nbytes > self.max_waiting_bytes

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; QueueFullError at the bound (then nothing is queued)."""
        with self._lock:
            if self._full(seq.nbytes):
                raise QueueFullError()
            seq.order = next(self._order)
            self._waiting.append((seq, self.clock()))

    def remove(self, handle: RequestHandle) -> Sequence | None:
        """Takes a waiting sequence out (its request was cancelled); None if it is not waiting."""
        with self._lock:
            for index, (seq, _) in enumerate(self._waiting):
                if seq.handle is handle:
                    del self._waiting[index]
                    return seq
        return None

    def drain(self) -> list[Sequence]:
        """Every waiting sequence, out of the queue (shutdown)."""
        with self._lock:
            waiting = [seq for seq, _ in self._waiting]
            self._waiting.clear()
        return waiting

    def wait_estimate_s(self) -> float:
        """Seconds until a request queued now would start: what the running requests still need plus every waiting
        one, shared among the `max_batch` sequences served at once."""
        with self._lock:
            now = self.clock()
            rest = sum(max(self._service_s[p] - (now - t0), 0.0) for p, t0 in self._started.values())
            work = rest + sum(self._service_s[seq.priority] for seq, _ in self._waiting)
        return work / max(1, self.max_batch)

    def _rank(self, entry: tuple[Sequence, float], now: float) -> tuple[int, int]:
        seq, enqueued = entry
        promoted = now - enqueued >= self.promote_after_s
        return (BACKGROUND if seq.priority == BACKGROUND and not promoted else INTERACTIVE, seq.order)

    # ---- lanes (the engine core's thread) ---------------------------------------------------------------------------

    def next_prompt(self) -> Sequence | None:
        """The next sequence to take its prompt in, out of the queue, when a lane is free; None otherwise."""
        if self.prefilling is not None or len(self.decoding) >= self.max_batch:
            return None
        with self._lock:
            if not self._waiting:
                return None
            now = self.clock()
            entry = min(self._waiting, key=lambda e: self._rank(e, now))
            self._waiting.remove(entry)
            seq = entry[0]
            self._started[seq.handle.id] = (seq.priority, now)
        seq.t_start = time.perf_counter()
        seq.lane = len(self.decoding)
        self.prefilling = seq
        return seq

    def prompt_done(self) -> tuple[int, int] | None:
        """The prefilling sequence joins the decode batch at lane B; returns the lane move (src, dst) it needs."""
        seq = self.prefilling
        assert seq is not None
        self.prefilling = None
        target, move = len(self.decoding), None
        if seq.lane != target:
            move, seq.lane = (seq.lane, target), target
        self.decoding.append(seq)
        return move

    def prompt_dropped(self) -> Sequence:
        """The prefilling sequence ends before it joins (cancelled or failed)."""
        seq = self.prefilling
        assert seq is not None
        self.prefilling = None
        self._retired(seq)
        return seq

    def retire(self, lane: int) -> tuple[int, int] | None:
        """The sequence in `lane` has ended; the last lane moves into its place. Returns that move (src, dst)."""
        seq = self.decoding[lane]
        last = len(self.decoding) - 1
        move = None
        if lane != last:
            self.decoding[lane] = self.decoding[last]
            self.decoding[lane].lane = lane
            move = (last, lane)
        self.decoding.pop()
        self._retired(seq)
        return move

    def retire_all(self) -> list[Sequence]:
        """Every decoding sequence ends at once (its step failed)."""
        ended, self.decoding = self.decoding, []
        for seq in ended:
            self._retired(seq)
        return ended

    def _retired(self, seq: Sequence) -> None:
        with self._lock:
            started = self._started.pop(seq.handle.id, None)
            if started is not None:
                priority, t0 = started
                self._service_s[priority] = 0.7 * self._service_s[priority] + 0.3 * (self.clock() - t0)


def prefill_chunk_for(device: str) -> int:
    return PREFILL_CHUNK.get(device, DEFAULT_PREFILL_CHUNK)
