"""A generation's handle and result, and the per-sequence stop-string matcher, for `common.engine.loop`.

`GenerationLoop` (common/loop.py) runs sequences with continuous batching; what a caller holds for one of them is
a `Generation`: iterate it for text deltas (or give a listener), cancel it from any thread, read its
`GenerationResult` when it ends.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.engine.sampling import SamplingParams
from common.model.inputs import PreparedInputs

if TYPE_CHECKING:
    from common.engine.loop import GenerationLoop

log = logging.getLogger(__name__)

FINISH_STOP = "stop"  # EOS or a stop string
FINISH_LENGTH = "length"  # max_new_tokens (or the lane's capacity) reached
FINISH_CANCELLED = "cancelled"  # cancel() before the natural end

Listener = Callable[[str, Any], None]  # (kind, payload): ("delta", str), ("done", GenerationResult), ("error", exc)


@dataclass
class GenerationResult:
    text: str  # post-processed: grounding boxes turned into Markdown image links / removed
    raw_text: str  # decode of the generated ids, special tokens kept, trailing EOS removed
    token_ids: list[int]  # generated ids (EOS included when generated)
    finish_reason: str  # FINISH_STOP, FINISH_LENGTH or FINISH_CANCELLED
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    crop_grid: list[int] | None  # [width tiles, height tiles] of the first image, None without crops
    timings: dict[str, float] = field(default_factory=dict)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "image_tokens": self.image_tokens,
        }


def crop_grid_of(prepared: PreparedInputs) -> list[int] | None:
    if not prepared.images or not prepared.images[0].has_crops:
        return None
    return list(prepared.images[0].crop_grid)


class StopMatcher:
    """Stop strings checked incrementally: each new piece of text is searched once, near its start."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, new_from: int) -> int:
        """Earliest index of a stop string in `text` that ends at or after `new_from`, or -1.

        Text before `new_from` was checked already and held no stop string, so only matches reaching into the
        new part are possible: each stop is searched from `new_from - len(stop) + 1`.
        """
        hits = [i for s in self.stops if (i := text.find(s, max(0, new_from - len(s) + 1))) >= 0]
        return min(hits, default=-1)

    def held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that could still grow into a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


class Generation:
    """A submitted sequence: iterate it for text deltas; `result` is set when it ends.

    `cancel()` may be called from any thread; the sequence ends within one loop iteration with finish reason
    "cancelled". With a `listener` the loop thread calls it for every event instead (the server); without one
    the events queue up for iteration. When no worker thread drives the loop, iterating drives it inline.
    """

    def __init__(self, loop: GenerationLoop, prepared: PreparedInputs, params: SamplingParams,
                 listener: Listener | None) -> None:
        self.loop, self.prepared, self.params = loop, prepared, params
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self._listener = listener
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._started = False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._cancel.set()
        self.loop.wake()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _emit(self, kind: str, payload: Any) -> None:
        if kind == "done":
            self.result = payload
        elif kind == "error":
            self.error = payload
        if self._listener is not None:
            try:
                self._listener(kind, payload)
            except Exception:  # a broken listener must not take the loop down
                log.exception("generation listener failed")
        else:
            self._events.put((kind, payload))
        if kind in ("done", "error"):
            self._done.set()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once")
        if self._listener is not None:
            raise RuntimeError("this Generation reports to a listener")
        self._started = True
        finished = False
        try:
            while True:
                try:
                    kind, payload = self._events.get_nowait()
                except queue.Empty:
                    if self.loop.drive_until(lambda: not self._events.empty()):
                        continue
                    kind, payload = self._events.get()  # a worker thread drives the loop
                if kind == "delta":
                    yield payload
                elif kind == "done":
                    finished = True
                    return
                else:
                    finished = True
                    raise payload
        finally:
            if not finished:  # the consumer left early: stop the sequence and wait for its result
                self.cancel()
                try:
                    if not self.loop.drive_until(self._done.is_set):
                        self._done.wait()
                except RuntimeError:  # the loop lost it (a bug): do not hide what brought us here
                    log.exception("a cancelled generation did not finish")

    def run(self) -> GenerationResult:
        for _ in self:
            pass
        assert self.result is not None
        return self.result
