"""One model, loaded once: prepares inputs, streams text, and reports a truthful result.

The CLI and the server both drive an `Engine`; neither knows which backend runs underneath.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from common.backend import Backend, PreparedInputs, ProgressCallback, load_backend
from common.config import ModelConfig, load_config
from common.device import select_backend
from common.errors import InputError
from common.families import family_named
from common.hub import resolve_model
from common.modes import Mode
from common.postprocess import clean_output, to_markdown
from common.prompt import prepare_inputs
from common.sampling import SamplingParams
from common.tokenizer import StreamingDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    text: str  # post-processed: grounding boxes turned into Markdown image links / removed
    raw_text: str  # decode of the generated ids, special tokens kept, trailing EOS removed
    token_ids: list[int]  # generated ids (EOS included when generated)
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_new_tokens reached)
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


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class Generation:
    """A running generation: iterate it for text deltas; `result` is set when it ends.

    `cancel()` may be called from any thread; generation stops before the next decode step.
    """

    def __init__(self, engine: Engine, prepared: PreparedInputs, params: SamplingParams) -> None:
        self.engine, self.prepared, self.params = engine, prepared, params
        self.result: GenerationResult | None = None
        self.cancelled = False
        self._cancel = threading.Event()
        self._started = False

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once")
        self._started = True
        engine, params = self.engine, self.params
        assert engine.backend is not None, "engine was created without a backend"
        eos = engine.tokenizer.eos_id
        detok = StreamingDetokenizer(engine.tokenizer)
        ids: list[int] = []
        text = ""  # decoded so far (specials kept, EOS excluded)
        emitted = 0
        finish = "length"
        stopped_at: int | None = None
        t0 = time.perf_counter()
        t_first = None
        stream = engine.backend.generate(self.prepared, params)
        try:
            for token_id in stream:
                if t_first is None:
                    t_first = time.perf_counter()
                ids.append(int(token_id))
                if token_id == eos:
                    finish = "stop"
                    break
                text += detok.add(int(token_id))
                if params.stop:
                    hit = min((i for s in params.stop if (i := text.find(s, max(0, emitted - len(s)))) >= 0),
                              default=-1)
                    if hit >= 0:
                        stopped_at, finish = hit, "stop"
                        if hit > emitted:
                            yield text[emitted:hit]
                        emitted = hit
                        break
                    safe = len(text) - _held_back(text, params.stop)
                else:
                    safe = len(text)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
                if self._cancel.is_set():
                    self.cancelled = True
                    break
            else:
                finish = "stop" if ids and ids[-1] == eos else "length"
            if stopped_at is None and not self.cancelled:
                text += detok.flush()
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted = len(text)
        finally:
            stream.close()  # cancels the backend's loop if we left early
            t_end = time.perf_counter()
            self.result = self._finish(ids, text if stopped_at is None else text[:stopped_at], finish, t0, t_first,
                                       t_end)

    def _finish(
        self, ids: list[int], text: str, finish: str, t0: float, t_first: float | None, t_end: float
    ) -> GenerationResult:
        prepared = self.prepared
        raw = clean_output(text) if text.strip() else ""
        display = raw
        if prepared.image_sizes:
            display = to_markdown(raw, prepared.image_sizes[0]).markdown
        ttft = (t_first - t0) if t_first is not None else 0.0
        decode_s = max(t_end - (t_first or t_end), 0.0)
        timings = {"ttft_s": ttft, "total_s": t_end - t0, "decode_s": decode_s}
        if len(ids) > 1 and decode_s > 0:
            timings["decode_tokens_per_s"] = (len(ids) - 1) / decode_s
        return GenerationResult(
            text=display,
            raw_text=raw,
            token_ids=ids,
            finish_reason=finish,
            prompt_tokens=prepared.prompt_tokens,
            completion_tokens=len(ids),
            image_tokens=prepared.image_tokens,
            crop_grid=crop_grid_of(prepared),
            timings=timings,
        )

    def run(self) -> GenerationResult:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class Engine:
    """Tokenizer + config + (optionally) a loaded backend."""

    def __init__(self, model_dir: Path, tokenizer: Tokenizer, config: ModelConfig, backend: Backend | None) -> None:
        self.model_dir, self.tokenizer, self.config, self.backend = model_dir, tokenizer, config, backend
        self.family = config.family  # which model this is (common.families): modes and token counts follow it

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        backend: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        revision: str | None = None,
        offline: bool = False,
        weights: bool = True,
        progress: ProgressCallback | None = None,
        show_download_progress: bool = True,
    ) -> Engine:
        """Resolves the model (downloading on first use) and, unless `weights=False`, loads it on a backend."""
        model_dir = resolve_model(model, revision=revision, offline=offline, show_progress=show_download_progress)
        config = load_config(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir)
        loaded: Backend | None = None
        if weights:
            name, dev = select_backend(backend, device)
            log.info("loading %s on %s/%s (dtype %s)", model_dir, name, dev, dtype)
            t0 = time.perf_counter()
            loaded = load_backend(name, model_dir, dev, dtype, progress)
            log.info("model loaded in %.1f s", time.perf_counter() - t0)
        return cls(model_dir, tokenizer, config, loaded)

    def prepare(self, prompt: str, images: list[Image.Image], mode: Mode) -> PreparedInputs:
        if mode.family != self.family.name:
            raise InputError(
                f"mode {mode.name!r} is a {family_named(mode.family).title} mode, but this model is {self.family.title}"
            )
        prepared = prepare_inputs(self.tokenizer, prompt, images, mode)
        prepared.image_sizes = [im.size for im in images]
        return prepared

    def generate(self, prepared: PreparedInputs, params: SamplingParams) -> Generation:
        if self.backend is None:
            raise RuntimeError("this engine was loaded without weights")
        return Generation(self, prepared, params)

    def describe(self) -> dict[str, Any]:
        b = self.backend
        return {
            "model_dir": str(self.model_dir),
            "family": self.family.name,
            "backend": b.name if b else None,
            "device": b.device if b else None,
            "dtype": b.dtype if b else None,
        }

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
