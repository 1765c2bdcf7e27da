"""Per-sequence output constraints inside the batched decode loop: the allowed-token masks of one step.

A constrained sequence (JSON by a schema, `common.engine.structured`) carries a `Constraint`: it consumes every
accepted token and writes the bitmask of the ids allowed next. `StepMasks` turns the constraints of a decode
batch into `StepControls.allowed` ([B, W] int32 rows, unconstrained lanes all ones) and, on request, computes
them on a helper thread while the forward pass runs: the mask work runs outside the GIL, so it overlaps a
forward pass that runs on the CPU as well as one queued on a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np

from common.engine.structured import ban_within_grammar, mask_width


class Constraint(Protocol):
    """What the loop needs of a sequence's grammar state (`common.engine.structured.GrammarMatcher` is one)."""

    def fill_mask(self, row: np.ndarray) -> None:
        """Writes the bitmask of the ids allowed next into `row` (int32 [W])."""
        ...

    def consume(self, token_id: int) -> bool:
        """Advances over an accepted token; False when the grammar does not allow it."""
        ...

    @property
    def finished(self) -> bool:
        """Nothing but EOS can follow: the output is complete."""
        ...

    @property
    def error(self) -> str | None: ...


class StructuredOutputError(RuntimeError):
    """A token outside the grammar reached a constrained sequence (a masking bug, never user input)."""


def bans_within(row: np.ndarray, banned: list[int]) -> list[int]:
    """The n-gram ban on top of a grammar row: both hold, unless the ban would leave nothing (then it yields)."""
    return ban_within_grammar(row, banned) if banned else banned


class StepMasks:
    """The allowed-token masks of the next token choice of a decode batch.

    `start(constraints)` begins filling rows for the lanes known after the accepted tokens were consumed (on the
    helper thread when `threaded`); `collect(constraints)` returns the rows for the final lane order (a prompt
    that joined meanwhile is filled then), or None when no lane is constrained.
    """

    def __init__(self, vocab_size: int, *, threaded: bool = False) -> None:
        self.width = mask_width(vocab_size)
        self.threaded = threaded
        self._pool: ThreadPoolExecutor | None = None
        self._started: list[Constraint | None] = []
        self._rows: np.ndarray | None = None
        self._pending: Future[None] | None = None

    def start(self, constraints: Sequence[Constraint | None]) -> None:
        self._wait()
        self._started = list(constraints)
        if not any(c is not None for c in self._started):
            self._rows = None
            return
        self._rows = np.full((len(self._started), self.width), -1, dtype=np.int32)
        if self.threaded:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="dsocr-masks")
            self._pending = self._pool.submit(_fill, self._started, self._rows)
        else:
            _fill(self._started, self._rows)

    def collect(self, constraints: Sequence[Constraint | None]) -> np.ndarray | None:
        self._wait()
        if not any(c is not None for c in constraints):
            return None
        started = {id(c): i for i, c in enumerate(self._started) if c is not None}
        rows = self._rows
        if rows is not None and len(constraints) == len(rows) and all(
            c is None or started.get(id(c)) == lane for lane, c in enumerate(constraints)
        ):
            out = rows  # the lane order did not change since start()
        else:
            out = np.full((len(constraints), self.width), -1, dtype=np.int32)
            for lane, constraint in enumerate(constraints):
                if constraint is None:
                    continue
                index = started.get(id(constraint))
                if rows is not None and index is not None:
                    out[lane] = rows[index]
                else:  # not started (a prompt that just joined)
                    constraint.fill_mask(out[lane])
        self._started, self._rows = [], None
        return out

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None


def _fill(constraints: Sequence[Constraint | None], rows: np.ndarray) -> None:
    for lane, constraint in enumerate(constraints):
        if constraint is not None:
            constraint.fill_mask(rows[lane])
