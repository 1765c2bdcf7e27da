"""The inference worker: one thread owns the engine and drives its generation loop (continuous batching).

MLX streams are thread-local and CUDA likes one owner, so only this thread touches the model (it also loads
it). HTTP handlers prepare requests (off the event loop) and `submit` them to a `RequestQueue` (ordering,
bounds, Retry-After); the worker moves requests from that queue into the generation loop as long as the loop
has room for them (`max_batch` sequences decode together), steps the loop, and sends each sequence's events
(text deltas, then the final result) back to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from common.documents.postprocess import GroundingStripper
from common.engine.queue import QueueFullError, RequestQueue
from common.engine.sampling import SamplingParams
from common.memory import trim_heap
from common.serve.errors import APIError, api_error_for
from common.serve.metrics import Metrics
from common.serve.schema import new_id

log = logging.getLogger("dsocr.server")

ProgressCallback = Callable[[str, int, int], None]
# After a request whose inputs held this much, freed heap is handed back to the system.
TRIM_AFTER_BYTES = 16 * 1024 * 1024


class GenerationLike(Protocol):
    result: Any

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...


class EngineLike(Protocol):
    """What the server needs from `common.engine.engine.Engine` (tests may pass a stand-in)."""

    def prepare(self, prompt: str, images: list[Any], mode: Any) -> Any: ...

    loop: Any  # common.engine.loop.GenerationLoop

    def generate(self, prepared: Any, params: SamplingParams, **kwargs: Any) -> GenerationLike: ...

    def describe(self) -> dict[str, Any]: ...

    def compile_json_spec(self, spec: Any) -> None: ...

    def close(self) -> None: ...


EngineLoader = Callable[[ProgressCallback], EngineLike]


class ShuttingDownError(Exception):
    pass


def inputs_nbytes(prepared: Any) -> int:
    """Bytes the prepared views hold (what a waiting request keeps in memory)."""
    total = 0
    for image in getattr(prepared, "images", []) or []:
        total += image.global_view.nbytes + (image.local_views.nbytes if image.local_views is not None else 0)
    return total


@dataclass(eq=False)
class InferenceRequest:
    """One generation job. Events go back to the event loop: ("delta", str), ("done", result), ("error", exc)."""

    prepared: Any
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    background: bool = False  # text-only: served after waiting image requests
    strip_grounding: bool = True
    id: str = field(default_factory=lambda: new_id("req"))
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    generation: GenerationLike | None = None
    on_cancel: Callable[[InferenceRequest], None] | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def nbytes(self) -> int:
        return inputs_nbytes(self.prepared)

    def cancel(self) -> None:
        """Thread-safe: a waiting request leaves the queue at once; a running one stops before its next step."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        generation = self.generation
        if generation is not None:
            generation.cancel()
        if self.on_cancel is not None:
            self.on_cancel(self)

    def emit(self, kind: str, payload: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Scheduler:
    """Owns the engine on one worker thread and serves queued requests, many at a time (continuous batching)."""

    def __init__(
        self,
        engine_or_loader: EngineLike | EngineLoader,
        max_queue: int,
        metrics: Metrics,
        on_load_error: Callable[[BaseException], None] | None = None,
        max_queued_bytes: int | None = None,
    ) -> None:
        self._source = engine_or_loader
        self.engine: EngineLike | None = None
        self.metrics = metrics
        self.state = "loading"
        self.load_error: str | None = None
        self.progress: dict[str, Any] = {}
        self._on_load_error = on_load_error
        self._queue: RequestQueue[InferenceRequest] = RequestQueue(max_queue, max_queued_bytes)
        self._cond = threading.Condition()
        self._running: list[InferenceRequest] = []
        self._stopping = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsocr-inference", daemon=True)
        self._ready_listeners: list[Callable[[EngineLike], None]] = []

    # --- public (event-loop side)
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def on_ready(self, listener: Callable[[EngineLike], None]) -> None:
        self._ready_listeners.append(listener)

    def start(self) -> None:
        self._thread.start()

    def full(self) -> bool:
        return self._queue.full()

    def retry_after_s(self) -> int:
        return max(1, round(self._queue.wait_estimate_s()))

    def submit(self, request: InferenceRequest) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDownError()
            request.on_cancel = self._withdraw
            try:
                self._queue.push(request, background=request.background, nbytes=request.nbytes)
            except QueueFullError:
                request.on_cancel = None
                self.metrics.record_rejected()
                raise
        self._wake()

    def _withdraw(self, request: InferenceRequest) -> None:
        if self._queue.remove(request):
            request.emit("error", APIError(499, "cancelled before it started"))
            if request.nbytes >= TRIM_AFTER_BYTES:
                trim_heap()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuses queued requests, cancels running ones and waits for the worker to finish."""
        with self._cond:
            already_stopping, self._stopping = self._stopping, True
            queued = self._queue.clear()
            running = list(self._running)
        self._stop.set()
        self._wake()
        for request in queued:
            request.emit("error", APIError(503, "the server is shutting down"))
            request.cancel()
        for request in running:
            request.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if already_stopping or self._thread.is_alive():
            return  # closed by the first caller, or the worker is stuck: leave the engine to process exit
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception:  # closing is best effort at exit
                log.exception("error closing the engine")

    def _wake(self) -> None:
        """The worker looks at the queue again (a request arrived, finished or the server stops)."""
        engine = self.engine
        loop = getattr(engine, "loop", None) if engine is not None else None
        if loop is not None:
            loop.wake()

    # --- worker thread
    def _progress(self, what: str, done: int, total: int) -> None:
        self.progress = {"what": what, "done": done, "total": total}
        if total and (done == total or done % max(1, total // 10) == 0):
            log.info("loading %s: %d/%d", what, done, total)

    def _run(self) -> None:
        if callable(self._source) and not hasattr(self._source, "generate"):
            try:
                self.engine = self._source(self._progress)
            except BaseException as exc:  # report, never crash silently
                self.state, self.load_error = "error", str(exc) or type(exc).__name__
                log.error("model failed to load: %s", self.load_error)
                if self._on_load_error is not None:
                    self._on_load_error(exc)
                return
        else:
            self.engine = self._source  # type: ignore[assignment]
        assert self.engine is not None
        loop = self.engine.loop
        loop.on_step = self.metrics.record_batch
        self._queue.concurrency = loop.max_batch
        for listener in self._ready_listeners:
            listener(self.engine)
        self.state = "ready"
        log.info("model ready: %s (up to %d sequences per decode step)", self.engine.describe(), loop.max_batch)
        loop.run(self._stop, admit=lambda: self._admit(loop))

    def _admit(self, loop: Any) -> None:
        """Moves waiting requests into the generation loop while it has room (runs on the worker thread)."""
        with self._cond:
            while loop.running + loop.waiting < loop.max_batch and (request := self._queue.pop()) is not None:
                self._running.append(request)
                self._start(request)
        self.metrics.running_sequences = loop.running

    def _start(self, request: InferenceRequest) -> None:
        """Submits one request to the generation loop, its events going straight back to the event loop."""
        assert self.engine is not None
        if request.cancelled:
            self._finished(request, error=APIError(499, "cancelled before it started"))
            return
        started = time.perf_counter()
        stripper = GroundingStripper() if request.strip_grounding else None
        first = [True]

        def on_event(kind: str, payload: Any) -> None:
            if kind == "delta":
                if first[0]:
                    self.metrics.record_ttft(time.perf_counter() - started)
                    first[0] = False
                delta = stripper.feed(payload) if stripper is not None else payload
                if delta:
                    request.emit("delta", delta)
            elif kind == "done":
                if stripper is not None and (tail := stripper.flush()):
                    request.emit("delta", tail)
                if first[0] and payload.completion_tokens:
                    self.metrics.record_ttft(time.perf_counter() - started)
                cancelled = payload.finish_reason == "cancelled"
                self.metrics.record_generation(payload.prompt_tokens, payload.completion_tokens, cancelled)
                self._finished(request, result=payload)
            else:
                self.metrics.record_failed()
                error = api_error_for(payload)
                if error.status >= 500:
                    log.error("generation failed: %s", payload, exc_info=payload)
                self._finished(request, error=error)

        try:
            generation = self.engine.generate(
                request.prepared, request.params, priority=int(request.background), listener=on_event
            )
        except Exception as exc:  # refused before it ran (bad input the loop caught)
            self.metrics.record_failed()
            self._finished(request, error=api_error_for(exc))
            return
        request.generation = generation
        if request.cancelled:  # cancel() raced with submission: make sure the generation sees it
            generation.cancel()

    def _finished(self, request: InferenceRequest, *, result: Any = None, error: APIError | None = None) -> None:
        if error is not None:
            request.emit("error", error)
        else:
            request.emit("done", result)
        self._queue.done(request)
        with self._cond:
            if request in self._running:
                self._running.remove(request)
        self._wake()
        if request.nbytes >= TRIM_AFTER_BYTES:
            request.prepared = request.generation = None  # the views are no longer needed: free them first
            trim_heap()
