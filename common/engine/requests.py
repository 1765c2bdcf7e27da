"""What a caller of the engine holds: the handle of one submitted request, and the result it ends with.

The engine core's thread is the only writer: it pushes text as it is generated and finishes the handle once.
Any thread reads: iterate the handle for text (a thread), or `async for` over `handle.stream()` (an event loop);
`cancel()` from anywhere. Text that arrives while the reader is busy is handed over in one piece, so a slow
reader costs one wake-up per read, not one per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

FINISH_STOP = "stop"  # EOS or a stop string
FINISH_LENGTH = "length"  # the request's max tokens reached
FINISH_CANCELLED = "cancelled"  # cancel() before the natural end

_ids = itertools.count(1)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model's raw distribution, and the most likely ids there."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class Delta(NamedTuple):
    """What a reader of the stream gets at once: the new text, and the new tokens' log-probabilities (when the
    request asked for them)."""

    text: str
    logprobs: list[TokenLogprob]


@dataclass
class GenerationResult:
    """A finished generation. `text` is exactly what was generated (up to a stop string, without EOS);
    post-processing (grounding to Markdown, figures) is the caller's (common.documents.postprocess)."""

    text: str
    token_ids: list[int]  # generated ids (EOS included when generated)
    finish_reason: str  # FINISH_STOP, FINISH_LENGTH or FINISH_CANCELLED
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    crop_grid: list[int] | None  # [width tiles, height tiles] of the first image, None without crops
    timings: dict[str, float] = field(default_factory=dict)  # queue_s, ttft_s, decode_s, total_s (seconds)
    logprobs: list[TokenLogprob] | None = None  # per generated token (EOS left out), when asked for

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "image_tokens": self.image_tokens,
        }


class RequestHandle:
    """One submitted request: its text as it is generated, then its `result` (or `error`)."""

    def __init__(self, on_cancel: Callable[[RequestHandle], None]) -> None:
        self.id = next(_ids)
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._pending: list[str] = []
        self._pending_logprobs: list[TokenLogprob] = []
        self._done = False
        self._cancelled = False
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._wake_queued = False
        self._done_callbacks: list[Callable[[RequestHandle], None]] = []

    @classmethod
    def answered(cls, text: str) -> RequestHandle:
        """A handle already finished with `text`, for a reply that needs no generation (read like any other)."""
        handle = cls(lambda _: None)
        handle._push(text)
        handle._finish(GenerationResult(text, [], FINISH_STOP, prompt_tokens=0, completion_tokens=0, image_tokens=0,
                                        crop_grid=None))
        return handle

    # ---- the engine core's side (its thread only) -------------------------------------------------------------

    def _push(self, text: str = "", logprob: TokenLogprob | None = None) -> None:
        with self._cond:
            if text:
                self._pending.append(text)
            if logprob is not None:
                self._pending_logprobs.append(logprob)
            self._notify()

    def _finish(self, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self._done:
                return
            self.result, self.error, self._done = result, error, True
            self._notify()
            callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            callback(self)

    def _notify(self) -> None:  # with the lock held
        self._cond.notify_all()
        if self._waker is not None and not self._wake_queued:
            loop, event = self._waker
            self._wake_queued = True
            with contextlib.suppress(RuntimeError):  # the reader's event loop is closed: nobody is listening
                loop.call_soon_threadsafe(event.set)

    # ---- the reader's side (any thread) --------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stops the request: a waiting one leaves the queue, a running one ends before its next step, with
        finish reason "cancelled". Idempotent; a no-op once it has finished."""
        with self._cond:
            if self._cancelled or self._done:
                return
            self._cancelled = True
        self._on_cancel(self)

    def add_done_callback(self, callback: Callable[[RequestHandle], None]) -> None:
        """Calls `callback(handle)` once the request has finished (now, if it has): on the finishing thread, so
        it must be quick (put the handle in a queue, set an event)."""
        with self._cond:
            if not self._done:
                self._done_callbacks.append(callback)
                return
        callback(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the request has finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done, timeout)

    def _take(self) -> tuple[Delta, bool]:  # with the lock held
        delta = Delta("".join(self._pending), self._pending_logprobs)
        self._pending, self._pending_logprobs = [], []
        self._wake_queued = False
        return delta, self._done

    def _raise_if_failed(self, finished: bool) -> None:
        if finished and self.error is not None:
            raise self.error

    def __iter__(self) -> Iterator[str]:
        """Text as it is generated, until the end; raises the request's error if it failed. A reader that stops
        early cancels the request."""
        finished = False
        try:
            while True:
                with self._cond:
                    # A bounded wait keeps the reading thread responsive to Ctrl-C.
                    while not self._pending and not self._done:
                        self._cond.wait(0.25)
                    delta, finished = self._take()
                if delta.text:
                    yield delta.text
                self._raise_if_failed(finished)
                if finished:
                    return
        finally:
            if not finished:
                self.cancel()

    def run(self) -> GenerationResult:
        """Waits for the result (the text is in it); raises the request's error if it failed."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def stream(self, idle_s: float | None = None) -> AsyncIterator[Delta | None]:
        """What is generated, read on an event loop: each Delta holds all that arrived since the last one; None
        after `idle_s` seconds without any (keep-alives). Ends when the request finishes (raising its error if it
        failed); the caller cancels if it leaves early."""
        event = asyncio.Event()
        with self._cond:
            self._waker = (asyncio.get_running_loop(), event)
            ready = bool(self._pending or self._pending_logprobs) or self._done
        if ready:
            event.set()
        while True:
            try:
                await asyncio.wait_for(event.wait(), idle_s)
            except TimeoutError:
                yield None
                continue
            event.clear()
            with self._cond:
                delta, finished = self._take()
            if delta.text or delta.logprobs:
                yield delta
            self._raise_if_failed(finished)
            if finished:
                return
