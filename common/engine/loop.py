"""The one generation loop: continuous batching over a step-level backend, and everything per sequence.

A `GenerationLoop` owns a backend's KV-cache lanes. Sequences are submitted from any thread; the thread that
drives the loop (the server's worker, the CLI's main thread, or whoever iterates a `Generation` when no
worker runs) does, per iteration:

1. the decode step for the lanes [0, B): on a device that runs asynchronously (MLX, CUDA) the forward pass is
   queued first and the previous step's tokens are read while it runs; on the CPU they are read first, so
   sequences that just ended are not computed again;
2. per sequence on the host: n-gram guard, EOS, `max_new_tokens`, stop strings, cancellation, detokenizing,
   text deltas; a sequence that ends leaves at once and the last lane moves into its place (lanes stay
   contiguous, so a decode step always runs [0, B));
3. at most one unit of prompt work (one vision view or one chunk of prompt positions) while others decode,
   so a long prompt stalls running sequences by one unit at most (interleaved chunked prefill); a prompt
   that finishes joins the batch at lane B;
4. token choice for every lane, with each sequence's own parameters, bans, allowed-token mask (a sequence
   constrained to JSON, `common.engine.constraints`) and uniform draw.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.documents.postprocess import clean_output, to_markdown
from common.engine.backend import Backend, PrefillJob, StepControls
from common.engine.constraints import Constraint, StepMasks, StructuredOutputError, bans_within
from common.engine.generation import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    GenerationResult,
    Listener,
    StopMatcher,
    crop_grid_of,
)
from common.engine.ngram import NGramGuard
from common.engine.sampling import SamplingParams
from common.errors import InputError
from common.model.inputs import PreparedInputs
from common.model.tokenizer import StreamingDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """Per-sequence state the loop keeps on the host."""

    gen: Generation
    order: int
    max_new_tokens: int
    guard: NGramGuard
    detok: StreamingDetokenizer
    stops: StopMatcher
    rng: np.random.Generator | None
    constraint: Constraint | None
    prompt_tokens: int
    image_tokens: int
    crop_grid: list[int] | None
    image_size: tuple[int, int] | None
    t_submit: float
    lane: int = -1
    job: PrefillJob | None = None
    t_start: float = 0.0
    t_first: float | None = None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    stopped_at: int | None = None
    failure: Exception | None = None  # ends the sequence with an error event instead of a result

    def __lt__(self, other: _Sequence) -> bool:  # heap tie-break: arrival order
        return self.order < other.order


class GenerationLoop:
    """Continuous batching of submitted sequences on one backend; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        *,
        max_batch: int | None = None,
        constraints: Callable[[Any], Constraint] | None = None,
        mask_thread: bool = False,
    ) -> None:
        """`constraints` makes a sequence's `Constraint` from its `params.json_spec` (the engine's grammar
        compiler); `mask_thread` computes allowed-token masks on a helper thread while the forward pass runs."""
        self.backend, self.tokenizer = backend, tokenizer
        self.constraints = constraints
        self._masks = StepMasks(backend.vocab_size, threaded=mask_thread)
        self.max_batch = max(1, min(max_batch or backend.lanes, backend.lanes))
        self.eos = tokenizer.eos_id
        self.overlap = bool(getattr(backend, "asynchronous", False))
        self._waiting: list[tuple[int, _Sequence]] = []  # heap of (priority, sequence)
        self._decoding: list[_Sequence] = []  # index = lane
        self._prefilling: _Sequence | None = None
        self._tokens: Any = None  # device tokens chosen for the decoding lanes, not yet read
        self._order = itertools.count()
        self._lock = threading.Condition()
        self._drive = threading.RLock()
        self._worker: threading.Thread | None = None
        self._woken = False
        self.steps = 0  # decode steps run
        self.batch_sizes: dict[int, int] = {}  # decode steps per batch size
        self.on_step: Callable[[int], None] | None = None  # called with each decode step's batch size

    # ---- submission (any thread) ------------------------------------------------------------------------

    def submit(
        self,
        prepared: PreparedInputs,
        params: SamplingParams,
        *,
        priority: int = 0,
        listener: Listener | None = None,
    ) -> Generation:
        """Queues a sequence (lower `priority` first, then arrival order); InputError if it cannot fit."""
        prompt_tokens = prepared.prompt_tokens
        if prepared.input_ids.ndim != 1 or prompt_tokens == 0:
            raise InputError("the prompt must be a non-empty 1-D sequence of token ids")
        room = self.backend.lane_capacity - prompt_tokens
        if room < 1:
            raise InputError(
                f"the prompt has {prompt_tokens} tokens; the model's context holds {self.backend.lane_capacity}"
            )
        constraint = None
        if params.json_spec is not None:
            if self.constraints is None:
                raise InputError("structured output is not available on this generation loop", param="response_format")
            constraint = self.constraints(params.json_spec)
        gen = Generation(self, prepared, params, listener)
        guard = NGramGuard(params.no_repeat_ngram_size, params.ngram_window, params.ngram_whitelist)
        guard.reset(prepared.input_ids.tolist())
        seq = _Sequence(
            gen=gen,
            order=next(self._order),
            max_new_tokens=min(params.max_new_tokens, room),
            guard=guard,
            detok=StreamingDetokenizer(self.tokenizer),
            stops=StopMatcher(params.stop),
            rng=None if params.greedy else np.random.default_rng(params.seed),
            constraint=constraint,
            prompt_tokens=prompt_tokens,
            image_tokens=prepared.image_tokens,
            crop_grid=crop_grid_of(prepared),
            image_size=prepared.image_sizes[0] if prepared.image_sizes else None,
            t_submit=time.perf_counter(),
        )
        with self._lock:
            heapq.heappush(self._waiting, (priority, seq))
            self._lock.notify_all()
        return gen

    def wake(self) -> None:
        with self._lock:
            self._woken = True
            self._lock.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._decoding) + (self._prefilling is not None)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._decoding or self._prefilling)

    # ---- driving --------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, admit: Callable[[], None] | None = None) -> None:
        """Drives the loop on the calling thread until `stop` is set (a server's worker thread).

        `admit()` runs before every iteration, so a caller can move work from its own queue into the loop when
        there is room; `wake()` (from any thread) makes an idle loop call it again. While this runs, iterating
        a `Generation` on another thread waits for its events instead of driving the loop itself.
        """
        self._worker = threading.current_thread()
        try:
            while not stop.is_set():
                if admit is not None:
                    admit()
                with self._lock:
                    while not self.busy and not stop.is_set() and not self._woken:
                        self._lock.wait()
                    self._woken = False
                if stop.is_set():
                    break
                if self.busy:
                    self.step()
        finally:
            self.cancel_all()
            self._worker = None

    def drive_until(self, condition: Callable[[], bool]) -> bool:
        """Steps the loop on this thread until `condition()`; False (doing nothing) if a worker thread drives."""
        if self._worker is not None and self._worker is not threading.current_thread():
            return False
        with self._drive:
            while not condition():
                if not self.busy:
                    raise RuntimeError("the generation loop is idle but the condition is not met")
                self.step()
        return True

    def cancel_all(self) -> None:
        """Ends every sequence (shutdown): running ones are finished as cancelled, waiting ones too."""
        with self._lock:
            waiting = [seq for _, seq in self._waiting]
            self._waiting.clear()
        for seq in waiting:
            seq.gen._cancel.set()
            self._finish(seq, FINISH_CANCELLED)
        for seq in list(self._decoding):
            seq.gen._cancel.set()
        if self._prefilling is not None:
            self._prefilling.gen._cancel.set()
        while self._decoding or self._prefilling is not None:
            self.step()

    def step(self) -> None:
        """One iteration: decode step, per-sequence bookkeeping, one unit of prompt work, token choice."""
        with self._drive:
            self._drop_cancelled_waiting()
            batch = len(self._decoding)
            logits = rows = None
            try:
                if batch and self.overlap:
                    logits = self.backend.forward(batch, self._tokens)
                if batch:
                    ids = self.backend.read(self._tokens)
                    self._record_step(batch)
                    rows = self._accept(ids)
                    self._masks.start([seq.constraint for seq in self._decoding])  # overlaps the forward pass
                    if not self.overlap and rows:
                        logits = self.backend.forward(len(rows), ids[rows])
                        rows = None  # already in lane order
            except Exception as exc:  # a failed step fails the batch, never the loop
                log.exception("decode step failed")
                self._fail_batch(exc)
                logits = rows = None
            joined = self._advance_prefill()
            self._choose_tokens(logits, rows, joined)

    # ---- the decode step's host side ----------------------------------------------------------------------

    def _record_step(self, batch: int) -> None:
        self.steps += 1
        self.batch_sizes[batch] = self.batch_sizes.get(batch, 0) + 1
        if self.on_step is not None:
            self.on_step(batch)

    def _accept(self, ids: np.ndarray) -> list[int]:
        """Hands each lane its token; removes sequences that ended. Returns, per remaining lane, its old row."""
        now = time.perf_counter()
        rows = list(range(len(self._decoding)))
        lane = 0
        while lane < len(self._decoding):
            seq = self._decoding[lane]
            reason = self._take_token(seq, int(ids[rows[lane]]), now)
            if reason is None and seq.gen.cancelled:
                reason = FINISH_CANCELLED
            if reason is None:
                lane += 1
                continue
            self._finish(seq, reason)
            last = len(self._decoding) - 1
            if lane != last:  # the last lane moves into the hole
                self.backend.move_lane(last, lane)
                self._decoding[lane] = self._decoding[last]
                self._decoding[lane].lane = lane
                rows[lane] = rows[last]
            self._decoding.pop()
            rows.pop()
        return rows

    def _take_token(self, seq: _Sequence, token: int, now: float) -> str | None:
        """Appends one generated token; returns a finish reason when the sequence ends with it."""
        if seq.t_first is None:
            seq.t_first = now
        seq.ids.append(token)
        constraint = seq.constraint
        if constraint is not None and not constraint.consume(token):
            seq.failure = StructuredOutputError(
                f"token {token} at position {len(seq.ids)} left the JSON grammar: {constraint.error}"
            )
            return FINISH_STOP
        if token == self.eos and (not seq.gen.params.ignore_eos or constraint is not None):
            return FINISH_STOP
        before = len(seq.text)
        seq.text += seq.detok.add(token)
        if seq.stops:
            hit = seq.stops.find(seq.text, before)
            if hit >= 0:
                seq.stopped_at = hit
                self._emit_text(seq, hit)
                return FINISH_STOP
            self._emit_text(seq, len(seq.text) - seq.stops.held_back(seq.text))
        else:
            self._emit_text(seq, len(seq.text))
        if constraint is not None and constraint.finished:
            return FINISH_STOP  # the JSON is complete: only EOS could follow, no step is spent on it
        if len(seq.ids) >= seq.max_new_tokens:
            return FINISH_LENGTH
        seq.guard.push(token)
        return None

    @staticmethod
    def _emit_text(seq: _Sequence, upto: int) -> None:
        if upto > seq.emitted:
            seq.gen._emit("delta", seq.text[seq.emitted : upto])
            seq.emitted = upto

    def _finish(self, seq: _Sequence, reason: str) -> None:
        if seq.job is not None:
            seq.job.close()
            seq.job = None
        if seq.stopped_at is None and reason != FINISH_CANCELLED:
            seq.text += seq.detok.flush()
            self._emit_text(seq, len(seq.text))
        if seq.failure is not None:
            seq.gen._emit("error", seq.failure)
            return
        text = seq.text if seq.stopped_at is None else seq.text[: seq.stopped_at]
        if seq.constraint is not None:  # the JSON text exactly as generated: no Markdown post-processing
            raw = display = text
        else:
            raw = clean_output(text) if text.strip() else ""
            display = to_markdown(raw, seq.image_size).markdown if seq.image_size is not None else raw
        end = time.perf_counter()
        start = seq.t_start or end
        first = seq.t_first
        timings = {
            "queue_s": start - seq.t_submit,
            "ttft_s": (first - start) if first is not None else 0.0,
            "total_s": end - seq.t_submit,
            "decode_s": (end - first) if first is not None else 0.0,
        }
        if len(seq.ids) > 1 and timings["decode_s"] > 0:
            timings["decode_tokens_per_s"] = (len(seq.ids) - 1) / timings["decode_s"]
        result = GenerationResult(
            text=display,
            raw_text=raw,
            token_ids=list(seq.ids),
            finish_reason=reason,
            prompt_tokens=seq.prompt_tokens,
            completion_tokens=len(seq.ids),
            image_tokens=seq.image_tokens,
            crop_grid=seq.crop_grid,
            timings=timings,
        )
        seq.gen._emit("done", result)

    def _fail_batch(self, exc: Exception) -> None:
        for seq in self._decoding:
            seq.gen._emit("error", exc)
        self._decoding.clear()
        self._tokens = None

    # ---- prompts ------------------------------------------------------------------------------------------------

    def _drop_cancelled_waiting(self) -> None:
        with self._lock:
            if not any(seq.gen.cancelled for _, seq in self._waiting):
                return
            cancelled = [seq for _, seq in self._waiting if seq.gen.cancelled]
            self._waiting = [item for item in self._waiting if not item[1].gen.cancelled]
            heapq.heapify(self._waiting)
        for seq in cancelled:
            self._finish(seq, FINISH_CANCELLED)

    def _advance_prefill(self) -> tuple[_Sequence, Any] | None:
        """Runs prompt work: one unit while others decode, else until a prompt is in. Returns a joiner."""
        if self._prefilling is None and not self._start_next_prefill():
            return None
        seq = self._prefilling
        assert seq is not None and seq.job is not None
        try:
            while True:
                if seq.gen.cancelled:
                    self._prefilling = None
                    self._finish(seq, FINISH_CANCELLED)
                    return None
                if seq.job.advance():
                    break
                if self._decoding:
                    return None  # one unit per iteration while others decode
            logits = seq.job.logits()
        except Exception as exc:  # the prompt failed (bad input reaching the device, memory): this one only
            self._prefilling = None
            seq.job.close()
            seq.job = None
            if not isinstance(exc, InputError):
                log.exception("prefill failed")
            seq.gen._emit("error", exc)
            return None
        seq.job.close()
        seq.job = None
        seq.gen.prepared = _summary_only(seq.gen.prepared)  # the views are no longer needed
        self._prefilling = None
        target = len(self._decoding)
        if seq.lane != target:
            self.backend.move_lane(seq.lane, target)
            seq.lane = target
        self._decoding.append(seq)
        return seq, logits

    def _start_next_prefill(self) -> bool:
        if len(self._decoding) >= self.max_batch:
            return False
        with self._lock:
            if not self._waiting:
                return False
            _, seq = heapq.heappop(self._waiting)
        seq.t_start = time.perf_counter()
        seq.lane = len(self._decoding)
        try:
            seq.job = self.backend.start_prefill(seq.lane, seq.gen.prepared)
        except Exception as exc:
            if not isinstance(exc, InputError):
                log.exception("prefill could not start")
            seq.gen._emit("error", exc)
            return False
        except BaseException:  # Ctrl-C: the sequence ends cancelled, the interrupt goes on
            seq.gen._cancel.set()
            self._finish(seq, FINISH_CANCELLED)
            raise
        self._prefilling = seq
        return True

    # ---- token choice --------------------------------------------------------------------------------------

    def _choose_tokens(self, logits: Any, rows: list[int] | None, joined: tuple[_Sequence, Any] | None) -> None:
        if not self._decoding:
            self._tokens = None
            return
        extra = [joined[1]] if joined is not None else []
        if logits is None:
            logits = extra.pop()
        elif extra or (rows is not None and rows != list(range(len(rows)))):
            logits = self.backend.gather(logits, rows, extra)
        try:
            self._tokens = self.backend.sample(logits, self._controls(self._masks.collect(
                [seq.constraint for seq in self._decoding])))
        except Exception as exc:
            log.exception("token choice failed")
            self._fail_batch(exc)

    def _controls(self, allowed: np.ndarray | None = None) -> StepControls:
        batch = len(self._decoding)
        temperature = np.zeros(batch, dtype=np.float32)
        top_k = np.zeros(batch, dtype=np.int32)
        top_p = np.ones(batch, dtype=np.float32)
        uniform = np.zeros(batch, dtype=np.float32)
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for lane, seq in enumerate(self._decoding):
            params = seq.gen.params
            if seq.rng is not None:
                temperature[lane], top_k[lane], top_p[lane] = params.temperature, params.top_k, params.top_p
                uniform[lane] = seq.rng.random()
            banned = seq.guard.banned()
            if allowed is not None and seq.constraint is not None:
                banned = bans_within(allowed[lane], banned)
            if banned:
                ban_rows.extend([lane] * len(banned))
                ban_ids.extend(banned)
        return StepControls(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            uniform=uniform,
            ban_rows=np.asarray(ban_rows, dtype=np.int64),
            ban_ids=np.asarray(ban_ids, dtype=np.int64),
            allowed=allowed,
        )


def _summary_only(prepared: PreparedInputs) -> PreparedInputs:
    """The same inputs without the pixel views (prompt ids, mask and sizes stay for reporting)."""
    return PreparedInputs(
        input_ids=prepared.input_ids,
        images_seq_mask=prepared.images_seq_mask,
        images=[],
        image_sizes=list(prepared.image_sizes),
    )
