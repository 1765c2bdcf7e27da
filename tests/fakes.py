"""A scripted stand-in for a model backend: the step-level Backend protocol without tensors.

Each request's tokens come from a script (the same list for every request, or a function of its inputs);
after the script the backend produces EOS. Bans from the n-gram guard are honoured the simple way: a banned
scripted token is replaced by the next id that is not banned. Counters let tests see what ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.engine.backend import StepControls
from common.model.inputs import PreparedInputs

Script = Sequence[int] | Callable[[PreparedInputs], Sequence[int]]


@dataclass
class _Cursor:
    """Where one lane is in its request's script: the next token to produce is script[position]."""

    script: Sequence[int]
    position: int = 0


class _Prefill:
    def __init__(self, backend: ScriptedBackend, lane: int, inputs: PreparedInputs, units: int) -> None:
        self.backend, self.lane, self.inputs, self.units_left = backend, lane, inputs, units

    def advance(self) -> bool:
        self.backend.prefill_units += 1
        if self.backend.prefill_s:
            time.sleep(self.backend.prefill_s / max(1, self.units_left))
        self.units_left -= 1
        if self.units_left > 0:
            return False
        self.backend.cursors[self.lane] = _Cursor(self.backend.script_for(self.inputs))
        return True

    def logits(self) -> list[_Cursor]:
        return [self.backend.cursors[self.lane]]

    def close(self) -> None:
        pass


class ScriptedBackend:
    name, device, dtype = "fake", "cpu", "float32"
    asynchronous = False

    def __init__(
        self,
        script: Script,
        eos_token_id: int,
        *,
        lanes: int = 8,
        lane_capacity: int = 8192,
        vocab_size: int = 129280,
        prefill_s: float = 0.0,
        step_s: float = 0.0,
        interrupt_on: int | None = None,
    ) -> None:
        self.script, self.eos_token_id = script, eos_token_id
        self.lanes, self.lane_capacity, self.vocab_size = lanes, lane_capacity, vocab_size
        self.prefill_s, self.step_s, self.interrupt_on = prefill_s, step_s, interrupt_on
        self.cursors: list[_Cursor | None] = [None] * lanes
        self.requests = 0  # prompts started
        self.prefill_units = 0
        self.steps = 0  # decode steps (forward calls)
        self.batch_sizes: list[int] = []
        self.events: list[str] = []  # "prefill" / "step" in the order they ran

    def script_for(self, inputs: PreparedInputs) -> Sequence[int]:
        return self.script(inputs) if callable(self.script) else self.script

    def start_prefill(self, lane: int, inputs: PreparedInputs) -> _Prefill:
        self.requests += 1
        if self.interrupt_on is not None and self.requests >= self.interrupt_on:
            raise KeyboardInterrupt
        self.events.append("prefill")
        return _Prefill(self, lane, inputs, units=1 + len(inputs.images))

    def forward(self, batch: int, tokens: Any) -> list[_Cursor]:
        self.steps += 1
        self.batch_sizes.append(batch)
        self.events.append("step")
        if self.step_s:
            time.sleep(self.step_s)
        out = []
        for lane in range(batch):
            cursor = self.cursors[lane]
            assert cursor is not None, f"lane {lane} decoded without a prompt"
            cursor.position += 1
            out.append(cursor)
        return out

    def gather(
        self, logits: list[_Cursor], rows: Sequence[int] | None, extra: Sequence[list[_Cursor]]
    ) -> list[_Cursor]:
        picked = list(logits) if rows is None else [logits[r] for r in rows]
        for more in extra:
            picked.extend(more)
        return picked

    def sample(self, logits: list[_Cursor], controls: StepControls) -> np.ndarray:
        assert len(logits) == controls.batch
        out = []
        for row, cursor in enumerate(logits):
            token = cursor.script[cursor.position] if cursor.position < len(cursor.script) else self.eos_token_id
            banned = set(controls.ban_ids[controls.ban_rows == row].tolist())
            while token in banned:
                token += 1
            out.append(token)
        return np.asarray(out, dtype=np.int64)

    def read(self, tokens: np.ndarray) -> np.ndarray:
        return tokens

    def move_lane(self, src: int, dst: int) -> None:
        self.cursors[dst] = self.cursors[src]

    def close(self) -> None:
        pass
