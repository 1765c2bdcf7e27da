"""The engine core: one thread owns a backend and runs its loop; everyone else submits and holds a handle.

The thread loads the backend (MLX's streams are thread-local, CUDA likes one owner), then, per iteration:

1. the decode step for the lanes [0, B): on an asynchronous device (MLX, CUDA) the forward pass is queued
   first and the previous step's tokens are read while it runs; on the CPU they are read first, so sequences
   that just ended are not computed again;
2. output processing per sequence (common.engine.output): n-gram guard, EOS, the token budget, stop strings,
   cancellation, text to the handle; a sequence that ends leaves at once (common.engine.scheduler keeps the
   lanes contiguous);
3. at most one unit of prompt work while others decode (one vision view or one chunk of prompt positions),
   so a long prompt stalls running sequences by one unit at most; a prompt that is in joins the batch;
4. token choice for every lane, with each sequence's own parameters, bans, allowed-token mask (a sequence
   constrained to JSON, common.engine.constraints) and uniform draw.

`submit` runs on the caller's thread: it fits the token budget to the lane (refusing what does not fit),
compiles a JSON constraint, and queues the request (refusing when the queue is full) before any model work.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from common.engine.backend import Backend, StepControls
from common.engine.constraints import Constraint, StepMasks
from common.engine.prefill import PrefillJob
from common.engine.requests import FINISH_CANCELLED, FINISH_STOP, RequestHandle
from common.engine.sampling import SamplingParams, fit_max_tokens
from common.engine.scheduler import Scheduler, prefill_chunk_for
from common.engine.sequence import INTERACTIVE, Sequence, StepLogprobs, step_controls
from common.errors import DsocrError, InputError
from common.memory import trim_heap
from common.model.inputs import PreparedInputs
from common.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")

LOADING, READY, FAILED, CLOSED = "loading", "ready", "error", "closed"
# After a request whose inputs held this much, freed heap is handed back to the system.
TRIM_AFTER_BYTES = 16 * 1024 * 1024


class EngineUnavailableError(DsocrError):
    """The engine cannot take requests: still loading, failed to load, or closed."""


class EngineCore:
    """Owns one backend on its own thread; see the module docstring."""

    def __init__(
        self,
        load: Callable[[], Backend],
        tokenizer: Tokenizer,
        *,
        model_context: int | None = None,
        max_batch: int | None = None,
        max_waiting: int | None = None,
        max_waiting_bytes: int | None = None,
        constraints: Callable[[Any], Constraint] | None = None,
        mask_thread: bool = False,
    ) -> None:
        """`load` builds the backend on the core's thread; `model_context` is the model's own context (for the
        wording of a refusal), `max_batch` the most sequences decoded together (default: every lane),
        `max_waiting`/`max_waiting_bytes` bound the queue, `constraints` makes a sequence's JSON constraint from
        its `json_spec` (on the submitting thread), `mask_thread` fills allowed-token masks on a helper thread
        while the forward pass runs."""
        self._load, self.tokenizer = load, tokenizer
        self._model_context, self._max_batch = model_context, max_batch
        self._max_waiting, self._max_waiting_bytes = max_waiting, max_waiting_bytes
        self._constraints, self._mask_thread = constraints, mask_thread
        self.state = LOADING
        self.load_error: BaseException | None = None
        self.load_seconds = 0.0
        self.backend: Backend | None = None
        self.scheduler: Scheduler | None = None
        self.steps = 0  # decode steps run
        self.batch_sizes: dict[int, int] = {}  # decode steps per batch size
        self.on_step: Callable[[int], None] | None = None  # with each decode step's batch size
        self.on_finish: Callable[[RequestHandle], None] | None = None  # with each finished request
        self._ready = threading.Event()
        self._closed = threading.Event()  # the backend is closed (the thread stays, parked)
        self._wake = threading.Condition()
        self._woken = False
        self._stopping = False
        self._stepping = threading.Lock()  # held for each iteration; `paused()` holds it from outside
        self._tokens: Any = None  # device tokens chosen for the decoding lanes, not yet read
        self._logprobs: Any = None  # their log-probabilities, when some lane asked for them (backend.logprobs)
        self._trim = False  # a large request ended: trim the heap after this iteration
        self._calls: list[tuple[Callable[[Backend], Any], Future[Any]]] = []  # see call()
        self._masks: StepMasks | None = None
        self._thread = threading.Thread(target=self._main, name="dsocr-engine", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> EngineCore:
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> Backend:
        """Blocks until the backend is loaded; raises what the load raised."""
        if not self._ready.wait(timeout):
            raise TimeoutError("the model is still loading")
        if self.backend is None:
            raise self.load_error or EngineUnavailableError("the engine is closed")
        return self.backend

    @property
    def ready(self) -> bool:
        return self.state == READY

    def close(self, timeout: float = 30.0) -> None:
        """Cancels every request (waiting ones at once, running ones with what they have), stops the thread and
        closes the backend on it."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._closed.wait(timeout)

    def limit_queue(self, max_waiting: int | None, max_waiting_bytes: int | None) -> None:
        """Bounds the waiting queue by count and by the bytes the waiting requests' inputs hold."""
        self._max_waiting, self._max_waiting_bytes = max_waiting, max_waiting_bytes
        if self.scheduler is not None:
            self.scheduler.max_waiting, self.scheduler.max_waiting_bytes = max_waiting, max_waiting_bytes

    def call(self, fn: Callable[[Backend], T], timeout: float | None = None) -> T:
        """Runs `fn(backend)` on the core's thread between two iterations and returns its value (benchmarks and
        tests that time or inspect the backend itself: an MLX backend's arrays belong to its thread)."""
        backend = self._backend()
        if threading.current_thread() is self._thread:
            return fn(backend)
        future: Future[T] = Future()
        with self._wake:
            if self._stopping:
                raise EngineUnavailableError("the engine is shutting down")
            self._calls.append((fn, future))
            self._woken = True
            self._wake.notify_all()
        return future.result(timeout)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No iteration runs inside the block: what is submitted there starts together (tests, benchmarks)."""
        with self._stepping:
            yield

    # ---- submission (any thread) --------------------------------------------------------------------------------

    @property
    def lane_capacity(self) -> int:
        return self._backend().lane_capacity

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch if self.scheduler is not None else 0

    @property
    def running(self) -> int:
        return self.scheduler.running if self.scheduler is not None else 0

    @property
    def waiting(self) -> int:
        return self.scheduler.waiting if self.scheduler is not None else 0

    def full(self) -> bool:
        return self.scheduler is not None and self.scheduler.full()

    def wait_estimate_s(self) -> float:
        return self.scheduler.wait_estimate_s() if self.scheduler is not None else 0.0

    def submit(self, prepared: PreparedInputs, params: SamplingParams, *, priority: int = INTERACTIVE
               ) -> RequestHandle:
        """Queues one request and returns its handle. Refuses before any model work: InputError when the prompt
        or its token budget does not fit a lane, `scheduler.QueueFullError` when the queue is full,
        EngineUnavailableError when the engine is not running."""
        backend = self._backend()
        scheduler = self.scheduler
        assert scheduler is not None
        if prepared.input_ids.ndim != 1 or prepared.prompt_tokens == 0:
            raise InputError("the prompt must be a non-empty 1-D sequence of token ids")
        budget = fit_max_tokens(prepared.prompt_tokens, params, backend.lane_capacity,
                                self._model_context or backend.lane_capacity)
        constraint = None
        if params.json_spec is not None:
            if self._constraints is None:
                raise InputError("structured output is not available on this engine", param="response_format")
            constraint = self._constraints(params.json_spec)
        handle = RequestHandle(self._cancel)
        seq = Sequence.new(handle, prepared, params, budget, priority, self.tokenizer, constraint)
        with self._wake:
            if self._stopping or self.state != READY:
                raise EngineUnavailableError("the engine is shutting down")
            scheduler.add(seq)
            self._woken = True
            self._wake.notify_all()
        return handle

    def _backend(self) -> Backend:
        if self.state != READY or self.backend is None:
            if self.state == FAILED and self.load_error is not None:
                raise EngineUnavailableError(f"the model failed to load: {self.load_error}")
            raise EngineUnavailableError("the model is loading" if self.state == LOADING else "the engine is closed")
        return self.backend

    def _cancel(self, handle: RequestHandle) -> None:
        """The one cancel path: a waiting request ends here and now; a running one at the core's next look."""
        seq = self.scheduler.remove(handle) if self.scheduler is not None else None
        if seq is not None:
            self._finish(seq, FINISH_CANCELLED)
        with self._wake:
            self._woken = True
            self._wake.notify_all()

    # ---- the core's thread ----------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            if self._start():
                try:
                    self._run()
                except BaseException as exc:  # a bug, or an interrupt raised in the backend: every request hears it
                    if isinstance(exc, Exception):
                        log.exception("the engine core stopped")
                    self._end_all(error=exc)
                finally:
                    self._shutdown()
        finally:
            self._closed.set()
        # The thread never exits: torch and MLX keep per-thread state (thread pools, streams) that aborts the
        # process when its thread ends before the interpreter does. Parked, a daemon thread holds nothing up.
        threading.Event().wait()

    def _start(self) -> bool:
        """Loads the backend; False (the error kept for whoever waits) when it fails."""
        try:
            t0 = time.perf_counter()
            backend = self._load()
            self.load_seconds = time.perf_counter() - t0
            max_batch = max(1, min(self._max_batch or backend.lanes, backend.lanes))
            self.scheduler = Scheduler(max_batch, prefill_chunk_for(backend.device), max_waiting=self._max_waiting,
                                       max_waiting_bytes=self._max_waiting_bytes)
            self._masks = StepMasks(backend.vocab_size, threaded=self._mask_thread)
            self.backend, self.state = backend, READY
            return True
        except BaseException as exc:  # reported to whoever waits, never lost
            self.load_error, self.state = exc, FAILED
            return False
        finally:
            self._ready.set()

    def _run(self) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        while True:
            with self._wake:
                while not self._stopping and not self._woken and not scheduler.busy and not self._calls:
                    self._wake.wait()
                self._woken = False
                if self._stopping:
                    return
            with self._stepping:
                self._run_calls()
                if scheduler.busy:
                    self._step()
                if self._trim:
                    self._trim = False
                    trim_heap()

    def _run_calls(self) -> None:
        with self._wake:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.backend))
                except BaseException as exc:  # the caller re-raises it
                    future.set_exception(exc)

    def _shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            calls, self._calls = self._calls, []
        for _, future in calls:
            future.cancel()
        self._end_all(error=None)
        if self._masks is not None:
            self._masks.close()
        backend, self.backend = self.backend, None
        self.state = CLOSED
        if backend is not None:
            try:
                backend.close()
            except Exception:  # closing is best effort at exit
                log.exception("error closing the backend")

    def _end_all(self, error: BaseException | None) -> None:
        """Every request ends: with `error`, or cancelled (what it generated so far is its result)."""
        scheduler = self.scheduler
        if scheduler is None:
            return
        ended = scheduler.drain() + scheduler.retire_all()
        if scheduler.prefilling is not None:
            ended.append(scheduler.prompt_dropped())
        self._tokens = self._logprobs = None
        for seq in ended:
            if error is not None:
                seq.failure = error  # type: ignore[assignment]
            self._finish(seq, FINISH_CANCELLED)

    def _step(self) -> None:
        """One iteration: decode step, output processing, one unit of prompt work, token choice."""
        backend, scheduler = self.backend, self.scheduler
        assert backend is not None and scheduler is not None
        batch = len(scheduler.decoding)
        logits = rows = None
        if batch:
            try:
                if backend.asynchronous:
                    logits = backend.forward(batch, self._tokens)
                ids = backend.read(self._tokens)
                logprobs = backend.read_logprobs(self._logprobs) if self._logprobs is not None else None
                self._record_step(batch)
                rows = self._accept(ids, logprobs)
                assert self._masks is not None
                self._masks.start([seq.constraint for seq in scheduler.decoding])  # overlaps the forward pass
                if not backend.asynchronous and rows:
                    logits = backend.forward(len(rows), ids[rows])
                    rows = None  # already in lane order
            except Exception as exc:  # a failed step fails its batch, never the core
                log.exception("decode step failed")
                self._fail_decoding(exc)
                logits = rows = None
        joined = self._advance_prompt()
        self._choose_tokens(logits, rows, joined)

    def _record_step(self, batch: int) -> None:
        self.steps += 1
        self.batch_sizes[batch] = self.batch_sizes.get(batch, 0) + 1
        if self.on_step is not None:
            self.on_step(batch)

    def _accept(self, ids: np.ndarray, logprobs: StepLogprobs | None) -> list[int]:
        """Hands each lane its token (and its log-probabilities); retires sequences that ended. Returns, per
        remaining lane, its old row."""
        scheduler = self.scheduler
        assert scheduler is not None
        now = time.perf_counter()
        rows = list(range(len(scheduler.decoding)))
        lane = 0
        while lane < len(scheduler.decoding):
            seq = scheduler.decoding[lane]
            try:
                reason = seq.take_token(int(ids[rows[lane]]), self.tokenizer.eos_id, now, logprobs, rows[lane])
            except Exception as exc:  # this sequence's own failure (its constraint, its text): it alone ends
                log.exception("a sequence failed")
                seq.failure, reason = exc, FINISH_STOP
            if reason is None and seq.handle.cancelled:
                reason = FINISH_CANCELLED
            if reason is None:
                lane += 1
                continue
            self._retire(lane, rows, reason)
        return rows

    def _retire(self, lane: int, rows: list[int], reason: str) -> None:
        """Ends the sequence in `lane`; the last lane moves into its place and `rows` (old row per lane) follows."""
        scheduler, backend = self.scheduler, self.backend
        assert scheduler is not None and backend is not None
        seq = scheduler.decoding[lane]
        move = scheduler.retire(lane)
        if move is not None:
            backend.move_lane(*move)
            rows[lane] = rows[move[0]]
        rows.pop()
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence: its handle gets the result (or its error). Any thread, for a sequence no lane holds."""
        if seq.job is not None:
            seq.job.close()
            seq.job = None
        seq.end(reason)
        if self.on_finish is not None:
            try:
                self.on_finish(seq.handle)
            except Exception:  # a broken hook must not take the core down
                log.exception("on_finish hook failed")
        if seq.nbytes >= TRIM_AFTER_BYTES:  # its views were freed: the core's thread hands that memory back
            self._trim = True

    def _fail_decoding(self, exc: Exception) -> None:
        assert self.scheduler is not None
        for seq in self.scheduler.retire_all():
            seq.failure = exc
            self._finish(seq, FINISH_STOP)
        self._tokens = self._logprobs = None

    # ---- prompts ----------------------------------------------------------------------------------------------------

    def _advance_prompt(self) -> tuple[Sequence, Any] | None:
        """Runs prompt work: one unit while others decode, else until a prompt is in. Returns one that joined and
        its logits."""
        scheduler, backend = self.scheduler, self.backend
        assert scheduler is not None and backend is not None
        seq = scheduler.prefilling
        if seq is None:
            seq = scheduler.next_prompt()
            if seq is None:
                return None
            assert seq.prepared is not None
            seq.job = PrefillJob(backend, seq.lane, seq.prepared, scheduler.prefill_chunk)
        assert seq.job is not None
        try:
            while True:
                if seq.handle.cancelled:
                    self._finish(scheduler.prompt_dropped(), FINISH_CANCELLED)
                    return None
                if seq.job.advance():
                    break
                if scheduler.decoding:
                    return None  # one unit per iteration while others decode
        except Exception as exc:  # the prompt failed (bad input reaching the device, memory): this one only
            if not isinstance(exc, InputError):
                log.exception("prefill failed")
            seq.failure = exc
            self._finish(scheduler.prompt_dropped(), FINISH_STOP)
            return None
        logits = seq.job.logits
        seq.job.close()
        seq.job, seq.prepared = None, None  # the views are no longer needed
        move = scheduler.prompt_done()
        if move is not None:
            backend.move_lane(*move)
        return seq, logits

    # ---- token choice -------------------------------------------------------------------------------------------

    def _choose_tokens(self, logits: Any, rows: list[int] | None, joined: tuple[Sequence, Any] | None) -> None:
        scheduler, backend = self.scheduler, self.backend
        assert scheduler is not None and backend is not None and self._masks is not None
        if not scheduler.decoding:
            self._tokens = self._logprobs = None
            return
        extra = [joined[1]] if joined is not None else []
        if logits is None:
            logits = extra.pop()
        elif extra or (rows is not None and rows != list(range(len(rows)))):
            logits = backend.gather(logits, rows, extra)
        try:
            decoding = scheduler.decoding
            controls = step_controls(decoding, self._masks.collect([seq.constraint for seq in decoding]))
        except Exception as exc:
            log.exception("token choice failed")
            self._fail_decoding(exc)
            return
        try:
            self._tokens = backend.sample(logits, controls)
        except Exception as exc:
            self._tokens, logits = self._choose_without_failing_rows(logits, controls, exc)
        wanted = [seq.params.logprobs for seq in scheduler.decoding if seq.params.logprobs is not None]
        self._logprobs = None
        if wanted and self._tokens is not None:
            try:
                self._logprobs = backend.logprobs(logits, self._tokens, max(wanted))
            except Exception as exc:
                log.exception("log-probabilities failed")
                self._fail_decoding(exc)

    def _choose_without_failing_rows(self, logits: Any, controls: StepControls, exc: Exception) -> tuple[Any, Any]:
        """A token choice that failed is tried again row by row: a sequence whose row fails alone ends with the error
        and the others are chosen together again, so one request's parameters never fail the batch."""
        scheduler, backend = self.scheduler, self.backend
        assert scheduler is not None and backend is not None
        failing: dict[int, Exception] = {}
        for lane in range(controls.batch):
            try:
                backend.read(backend.sample(backend.gather(logits, [lane], []), controls.select([lane])))
            except Exception as row_exc:
                failing[lane] = row_exc
        if not failing or len(failing) == controls.batch:  # not one sequence's doing
            log.error("token choice failed", exc_info=exc)
            self._fail_decoding(exc)
            return None, logits
        rows = list(range(controls.batch))
        for lane in sorted(failing, reverse=True):  # from the last lane down, so a move never lands on a failing one
            log.error("token choice failed for one sequence", exc_info=failing[lane])
            scheduler.decoding[lane].failure = failing[lane]
            self._retire(lane, rows, FINISH_STOP)
        logits = backend.gather(logits, rows, [])
        try:
            return backend.sample(logits, controls.select(rows)), logits
        except Exception as again:
            log.exception("token choice failed")
            self._fail_decoding(again)
            return None, logits
