"""One model, loaded once: prepares inputs, streams text, and reports a truthful result.

The CLI and the server both drive an `Engine`; neither knows which backend runs underneath.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from common.engine.backend import Backend, ProgressCallback, load_backend
from common.engine.generation import Generation, GenerationResult, Listener, crop_grid_of
from common.engine.loop import GenerationLoop
from common.engine.sampling import SamplingParams, ngram_whitelist_ids, with_ngram_whitelist
from common.errors import InputError
from common.memory import collector_paused, keep_freed_heap, trim_heap
from common.model.config import ModelConfig, load_config
from common.model.device import select_backend
from common.model.families import ModelFamily, family_named, family_of_model_dir
from common.model.hub import resolve_model
from common.model.inputs import PreparedInputs
from common.model.modes import Mode
from common.model.prompt import prepare_inputs
from common.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from common.engine.structured import GrammarCompiler, GrammarMatcher, JsonSpec

__all__ = ["Engine", "Generation", "GenerationResult", "crop_grid_of"]

log = logging.getLogger(__name__)


class Engine:
    """Tokenizer + config + (optionally) a loaded backend and the generation loop that drives it."""

    def __init__(
        self,
        model_dir: Path,
        tokenizer: Tokenizer,
        config: ModelConfig,
        backend: Backend | None,
        *,
        max_batch: int | None = None,
    ) -> None:
        self.model_dir, self.tokenizer, self.config, self.backend = model_dir, tokenizer, config, backend
        self.family = config.family  # which model this is (common.model.families): modes and token counts follow it
        self.ngram_whitelist = ngram_whitelist_ids(tokenizer)
        self._grammar: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self.load_timings: dict[str, float] = {}  # seconds: tokenizer_s, weights_s (set by Engine.load)
        self.loop = (
            GenerationLoop(backend, tokenizer, max_batch=max_batch, constraints=self.constraint_for)
            if backend is not None
            else None
        )

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
        max_batch: int | None = None,
        kv_cache_gib: float | None = None,
        max_context: int | None = None,
        cuda_graphs: bool | None = None,
    ) -> Engine:
        """Resolves the model (downloading on first use) and, unless `weights=False`, loads it on a backend.

        `max_batch` is the most sequences decoded together (default: the backend's per-device default);
        `kv_cache_gib`, `max_context` and `cuda_graphs` go to the backend (see `common.engine.backend.load_backend`).
        """
        model_dir = resolve_model(model, revision=revision, offline=offline, show_progress=show_download_progress)
        timings: dict[str, float] = {}
        if weights:
            keep_freed_heap()
        with collector_paused():
            config = load_config(model_dir)
            t0 = time.perf_counter()
            tokenizer = Tokenizer.from_dir(model_dir)
            timings["tokenizer_s"] = time.perf_counter() - t0
            loaded: Backend | None = None
            if weights:
                name, dev = select_backend(backend, device)
                log.info("loading %s on %s/%s (dtype %s)", model_dir, name, dev, dtype)
                t0 = time.perf_counter()
                loaded = load_backend(
                    name, model_dir, dev, dtype, progress, max_batch=max_batch, kv_cache_gib=kv_cache_gib,
                    max_context=max_context, cuda_graphs=cuda_graphs,
                )
                timings["weights_s"] = time.perf_counter() - t0
                trim_heap()  # what the load freed goes back (a first load: weights packed before the cache held them)
                log.info("model loaded in %.1f s (%d lanes of %d positions)", timings["weights_s"],
                         loaded.lanes, loaded.lane_capacity)
        engine = cls(model_dir, tokenizer, config, loaded, max_batch=max_batch)
        engine.load_timings = timings
        return engine

    def prepare(self, prompt: str, images: list[Image.Image], mode: Mode) -> PreparedInputs:
        if mode.family != self.family.name:
            other = family_named(mode.family).title
            message = f"mode {mode.name!r} is a {other} mode, but this model is {self.family.title}"
            raise InputError(message, param="mode")
        prepared = prepare_inputs(self.tokenizer, prompt, images, mode)
        prepared.image_sizes = [im.size for im in images]
        return prepared

    def generate(
        self,
        prepared: PreparedInputs,
        params: SamplingParams,
        *,
        priority: int = 0,
        listener: Listener | None = None,
    ) -> Generation:
        """Queues one sequence on the generation loop; iterate the result for text (see `Generation`)."""
        if self.loop is None:
            raise RuntimeError("this engine was loaded without weights")
        params = with_ngram_whitelist(params, self.ngram_whitelist)
        return self.loop.submit(prepared, params, priority=priority, listener=listener)

    def grammar(self) -> GrammarCompiler:
        """The model's grammar compiler, built on first use (it indexes the whole vocabulary: seconds)."""
        with self._grammar_lock:
            if self._grammar is None:
                from common.engine.structured import GrammarCompiler

                t0 = time.perf_counter()
                self._grammar = GrammarCompiler.from_model_dir(
                    self.model_dir, eos_id=self.tokenizer.eos_id, vocab_size=self.config.language.vocab_size
                )
                log.info("grammar compiler ready in %.1f s", time.perf_counter() - t0)
            return self._grammar

    def compile_json_spec(self, spec: JsonSpec) -> None:
        """Compiles (and caches) a spec's grammar now, so a request pays for it before it is queued and a
        grammar the tokenizer cannot serve is an InputError there; the server calls it off the worker thread."""
        self.grammar().matcher(spec)

    def constraint_for(self, spec: JsonSpec) -> GrammarMatcher:
        """A fresh grammar state for one sequence (the loop calls it at submission)."""
        return self.grammar().matcher(spec)

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



@dataclass(frozen=True)
class ModelOptions:
    model: str | None = None
    revision: str | None = None
    offline: bool = False
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int | None = None
    kv_cache_gib: float | None = None
    max_context: int | None = None
    cuda_graphs: bool | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        # argparse runs a flag's type on a string default too, so DSOCR_* values arrive parsed and checked.
        return cls(
            args.model, args.revision, args.offline, args.backend, args.device, args.dtype,
            args.max_batch, args.kv_cache_gib, args.max_context, args.cuda_graphs,
        )

    def resolved(self, show_download_progress: bool = True) -> tuple[ModelOptions, ModelFamily]:
        """These options with `model` as a local directory (downloading it on first use, as loading would) and
        the model's family, read from its config.json: what decides the valid modes before the weights load."""
        from common.model.hub import resolve_model

        model_dir = resolve_model(self.model, revision=self.revision, offline=self.offline,
                                  show_progress=show_download_progress)
        return replace(self, model=str(model_dir)), family_of_model_dir(model_dir)

    def load(self, *, weights: bool = True, progress: ProgressCallback | None = None,
             show_download_progress: bool = True) -> Any:
        """The Engine (tokenizer and config; the weights on the chosen backend unless `weights=False`)."""
        from common.engine.engine import Engine

        return Engine.load(
            self.model,
            backend=self.backend,
            device=self.device,
            dtype=self.dtype,
            revision=self.revision,
            offline=self.offline,
            weights=weights,
            progress=progress,
            show_download_progress=show_download_progress,
            max_batch=self.max_batch,
            kv_cache_gib=self.kv_cache_gib,
            max_context=self.max_context,
            cuda_graphs=self.cuda_graphs,
        )
