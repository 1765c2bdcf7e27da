"""A scripted stand-in for a model backend: the Backend protocol without tensors, and engines built on it.

Each request's tokens come from a script (the same list for every request, or a function of its inputs);
after the script the backend produces EOS. Bans from the n-gram guard are honoured the simple way: a banned
scripted token is replaced by the next id that is not banned. Counters let tests see what ran.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.engine.backend import StepControls
from common.engine.engine import Engine
from common.model.config import load_config
from common.model.inputs import PreparedInputs
from common.model.tokenizer import Tokenizer

Script = Sequence[int] | Callable[[PreparedInputs], Sequence[int]]
# The tiny fixture model (tests/conftest.MODEL_DIR; spelled out here so that benchmarks can use these fakes
# without the test configuration).
FIXTURE_MODEL = Path(__file__).resolve().parent / "fixtures" / "deepseek-ocr" / "model"


@functools.cache
def _fixture_language() -> Any:
    return load_config(FIXTURE_MODEL).language


@dataclass
class _Cursor:
    """Where one lane is in its request's script: the next token to produce is script[position]."""

    script: Sequence[int]
    position: int = 0


class ScriptedBackend:
    name, device, dtype = "fake", "cpu", "float32"
    asynchronous = False

    def __init__(
        self,
        script: Script,
        eos_token_id: int,
        *,
        lanes: int = 8,
        lane_capacity: int | None = None,
        vocab_size: int | None = None,
        prefill_s: float = 0.0,
        step_s: float = 0.0,
        interrupt_on: int | None = None,
    ) -> None:
        self.script, self.eos_token_id = script, eos_token_id
        # The fixture model's context and vocabulary unless a test asks for others.
        language = _fixture_language()
        self.lane_capacity = language.max_position_embeddings if lane_capacity is None else lane_capacity
        self.vocab_size = language.vocab_size if vocab_size is None else vocab_size
        self.lanes = lanes
        self.prefill_s, self.step_s, self.interrupt_on = prefill_s, step_s, interrupt_on
        self.cursors: list[_Cursor | None] = [None] * lanes
        self.requests = 0  # prompts started
        self.prefill_units = 0  # views encoded + prompt chunks
        self.steps = 0  # decode steps (forward calls)
        self.batch_sizes: list[int] = []
        self.events: list[str] = []  # "prefill" (a prompt's first unit) / "step", in the order they ran
        self.closed = False

    def script_for(self, inputs: PreparedInputs) -> Sequence[int]:
        return self.script(inputs) if callable(self.script) else self.script

    def _unit(self, first: bool) -> None:
        if first:
            self.requests += 1
            if self.interrupt_on is not None and self.requests >= self.interrupt_on:
                raise KeyboardInterrupt
            self.events.append("prefill")
        self.prefill_units += 1
        if self.prefill_s:
            time.sleep(self.prefill_s / 2)  # a prompt without images is two units: embed + one chunk

    def encode_view(self, pixels: np.ndarray, trace: Any = None) -> str:
        return "view"

    def embed_prompt(self, inputs: PreparedInputs, views: Sequence[Any], trace: Any = None) -> PreparedInputs:
        self._unit(first=True)
        assert len(views) == sum(1 + (len(im.local_views) if im.has_crops else 0) for im in inputs.images)
        return inputs

    def prefill(self, lane: int, embeds: PreparedInputs, start: int, end: int, trace: Any = None) -> Any:
        self._unit(first=False)
        if end < embeds.prompt_tokens:
            return None
        self.cursors[lane] = _Cursor(self.script_for(embeds))
        return [self.cursors[lane]]

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

    def logprobs(self, logits: list[_Cursor], tokens: np.ndarray, top: int) -> tuple[np.ndarray, ...]:
        """Made-up log-probabilities, exact in float32: the token chosen at a lane's generated position p (0 for
        the first token after the prompt) gets -0.5 * (p % 3); the top ids are chosen, chosen + 1, ...,
        chosen + top - 1 (mod vocab_size), the j-th of them with log-prob -0.5 * (p % 3) - j (so top id 0 is the
        chosen token, with the same log-prob)."""
        assert len(logits) == len(tokens) and top >= 0
        positions = np.asarray([cursor.position for cursor in logits], dtype=np.int64)
        chosen = (0.0 - 0.5 * (positions % 3)).astype(np.float32)  # 0.0, never -0.0
        steps = np.arange(top, dtype=np.int64)
        ids = (np.asarray(tokens, dtype=np.int64)[:, None] + steps) % self.vocab_size
        values = (chosen[:, None] - steps).astype(np.float32)
        return chosen, ids.reshape(len(logits), top), values.reshape(len(logits), top)

    def read_logprobs(self, handle: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chosen, ids, values = handle
        return chosen, ids, values

    def move_lane(self, src: int, dst: int) -> None:
        self.cursors[dst] = self.cursors[src]

    def close(self) -> None:
        self.closed = True


class SlowBackend(ScriptedBackend):
    """A fixed prefill delay, then one token per `step_s`, never EOS; each request's tokens follow its prompt."""

    def __init__(self, eos_token_id: int, prefill_s: float = 0.0, step_s: float = 0.0) -> None:
        def script(inputs: PreparedInputs) -> list[int]:
            seed = int(inputs.input_ids.sum())
            return [1000 + (seed + 7 * i) % 500 for i in range(8192)]

        super().__init__(script, eos_token_id, prefill_s=prefill_s, step_s=step_s)

    @property
    def started(self) -> int:
        return self.requests


class RecordingBackend(ScriptedBackend):
    """Answers `reply` then EOS, and records each prompt it takes in (`seen`: its input ids)."""

    def __init__(self, tokenizer: Tokenizer, reply: str = "# Quarterly report") -> None:
        super().__init__(tokenizer.encode(reply), tokenizer.eos_id)
        self.seen: list[list[int]] = []

    def embed_prompt(self, inputs: PreparedInputs, views: Sequence[Any], trace: Any = None) -> PreparedInputs:
        self.seen.append(inputs.input_ids.tolist())
        return super().embed_prompt(inputs, views, trace)


class RecordingEngine(Engine):
    """An Engine that records the sampling parameters of each request it submits (`submitted`)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.submitted: list[tuple[list[int], Any]] = []

    def submit(self, prepared: PreparedInputs, params: Any, **kwargs: Any) -> Any:
        self.submitted.append((prepared.input_ids.tolist(), params))
        return super().submit(prepared, params, **kwargs)


def fixture_engine(backend: Any, model_dir: Path | None = None, *, cls: type[Engine] = Engine, **core: Any) -> Engine:
    """An Engine with the tiny fixture model's tokenizer and config whose core runs `backend`."""
    from tests.conftest import MODEL_DIR, fixture_tokenizer

    model_dir = model_dir or MODEL_DIR
    engine = cls(model_dir, fixture_tokenizer(model_dir), load_config(model_dir))
    return engine.start(lambda: backend, **core)


def script_engine(text: str, *, interrupt_on: int | None = None, **core: Any) -> Engine:
    """An Engine whose every request answers `text` (then EOS), on the fixture model's tokenizer."""
    from tests.conftest import fixture_tokenizer

    tokenizer = fixture_tokenizer()
    return fixture_engine(ScriptedBackend(tokenizer.encode(text), tokenizer.eos_id, interrupt_on=interrupt_on),
                          **core)


class Lent:
    """A backend (or an engine) lent for one use: whoever closes it at the end leaves it open for the next one."""

    def __init__(self, lent: Any) -> None:
        self.lent = lent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lent, name)

    def close(self) -> None:
        pass


def lent_core(backend: Any, tokenizer: Tokenizer, **core: Any) -> Any:
    """A started, ready EngineCore running `backend` (not closed with the core)."""
    from common.engine.core import EngineCore

    started = EngineCore(lambda: Lent(backend), tokenizer, **core).start()
    started.wait_ready()
    return started
