"""One model, loaded once: what the CLI, the server, Ray actors and benchmarks hold.

An `Engine` has the model's tokenizer and config (enough to prepare inputs, which needs no weights) and, unless
loaded without weights, an `EngineCore` whose thread owns the backend. Callers prepare inputs on their own
threads and `submit` them; nobody else touches the backend or its loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from common.engine.backend import Backend, ProgressCallback, load_backend
from common.engine.core import EngineCore
from common.engine.requests import GenerationResult, RequestHandle
from common.engine.sampling import SamplingParams, ngram_whitelist_ids, with_ngram_whitelist
from common.engine.sequence import INTERACTIVE
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelOptions:
    """Which model to run and how: the choices behind --model, --backend, --device, --dtype and the engine's
    bounds (--max-batch, --kv-cache-gib, --max-context, --cuda-graphs), and --quantize."""

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
    quantize: str = "none"

    def resolved(self, show_download_progress: bool = True) -> tuple[ModelOptions, ModelFamily]:
        """These options with `model` as a local directory (downloading it on first use, as loading would) and
        the model's family, read from its config.json: what decides the valid modes before the weights load."""
        model_dir = resolve_model(self.model, revision=self.revision, offline=self.offline,
                                  show_progress=show_download_progress)
        return replace(self, model=str(model_dir)), family_of_model_dir(model_dir)

    def load(self, *, weights: bool = True, progress: ProgressCallback | None = None,
             show_download_progress: bool = True, **core: Any) -> Engine:
        """The Engine (tokenizer and config; the weights on the chosen backend unless `weights=False`); `core`
        goes to the EngineCore (queue bounds)."""
        return Engine.load(self, weights=weights, progress=progress,
                           show_download_progress=show_download_progress, **core)


class Engine:
    """Tokenizer + config, and (unless loaded without weights) the engine core that runs the model."""

    def __init__(self, model_dir: Path, tokenizer: Tokenizer, config: ModelConfig) -> None:
        self.model_dir, self.tokenizer, self.config = model_dir, tokenizer, config
        self.family = config.family  # which model this is (common.model.families): modes and token counts follow it
        self.ngram_whitelist = ngram_whitelist_ids(tokenizer)
        self.core: EngineCore | None = None
        self.load_timings: dict[str, float] = {}  # seconds: tokenizer_s, weights_s
        self._grammar: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()

    @classmethod
    def load(cls, options: ModelOptions | str | Path | None = None, *, weights: bool = True,
             progress: ProgressCallback | None = None, show_download_progress: bool = True, **kwargs: Any) -> Engine:
        """Resolves the model (downloading on first use), reads its tokenizer and config here, and unless
        `weights=False` starts the engine core, which loads the weights on its own thread; returns once they are
        loaded (raising what the load raised). `options` may be a model (path or repo id) with ModelOptions'
        fields as keywords; other keywords go to the EngineCore (queue bounds, mask_thread)."""
        if not isinstance(options, ModelOptions):
            fields = {k: kwargs.pop(k) for k in list(kwargs) if k in ModelOptions.__dataclass_fields__}
            options = ModelOptions(str(options) if options is not None else None, **fields)
        core = kwargs
        model_dir = resolve_model(options.model, revision=options.revision, offline=options.offline,
                                  show_progress=show_download_progress)
        t0 = time.perf_counter()
        with collector_paused():
            engine = cls(model_dir, Tokenizer.from_dir(model_dir), load_config(model_dir))
        engine.load_timings["tokenizer_s"] = time.perf_counter() - t0
        if weights:
            name, device = select_backend(options.backend, options.device)

            def load() -> Backend:
                log.info("loading %s on %s/%s (dtype %s)", model_dir, name, device, options.dtype)
                keep_freed_heap()
                with collector_paused():
                    backend = load_backend(name, model_dir, device, options.dtype, progress,
                                           max_batch=options.max_batch, kv_cache_gib=options.kv_cache_gib,
                                           max_context=options.max_context, cuda_graphs=options.cuda_graphs,
                                           quantize=options.quantize)
                trim_heap()  # what the load freed goes back (a first load packs weights before the cache holds them)
                return backend

            engine.start(load, max_batch=options.max_batch, **core)
            engine.load_timings["weights_s"] = engine.core.load_seconds  # type: ignore[union-attr]
            log.info("model loaded in %.1f s (%d lanes of %d positions)", engine.load_timings["weights_s"],
                     engine.core.backend.lanes, engine.core.backend.lane_capacity)  # type: ignore[union-attr]
        return engine

    def start(self, load: Callable[[], Backend], *, wait: bool = True, **core: Any) -> Engine:
        """Starts the engine core on `load` (a backend factory run on the core's thread); `core` goes to
        `EngineCore` (max_batch, queue bounds, mask_thread). Waits for the load unless `wait=False`."""
        self.core = EngineCore(load, self.tokenizer, model_context=self.config.language.max_position_embeddings,
                               constraints=self.constraint_for, **core).start()
        if wait:
            try:
                self.core.wait_ready()
            except BaseException:
                self.core.close()
                raise
        return self

    def prepare(self, prompt: str, images: list[Image.Image], mode: Mode) -> PreparedInputs:
        """Token ids and views for one request (no weights needed; any thread)."""
        if mode.family != self.family.name:
            other = family_named(mode.family).title
            message = f"mode {mode.name!r} is a {other} mode, but this model is {self.family.title}"
            raise InputError(message, param="mode")
        prepared = prepare_inputs(self.tokenizer, prompt, images, mode)
        prepared.image_sizes = [im.size for im in images]
        return prepared

    def submit(self, prepared: PreparedInputs, params: SamplingParams, *, priority: int = INTERACTIVE
               ) -> RequestHandle:
        """Queues one request on the engine core (see `EngineCore.submit` for what is refused, and when)."""
        return self._core().submit(prepared, with_ngram_whitelist(params, self.ngram_whitelist), priority=priority)

    def generate(self, prepared: PreparedInputs, params: SamplingParams) -> GenerationResult:
        """Submits one request and waits for its result."""
        return self.submit(prepared, params).run()

    @property
    def lane_capacity(self) -> int:
        """Positions per sequence (prompt + output): the model's context, or --max-context."""
        return self._core().lane_capacity

    def _core(self) -> EngineCore:
        if self.core is None:
            raise RuntimeError("this engine was loaded without weights")
        return self.core

    # ---- structured output ------------------------------------------------------------------------------------

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
        """Compiles (and caches) a spec's grammar now, so a grammar the tokenizer cannot serve is an InputError
        before any page is prepared (the CLI)."""
        self.grammar().matcher(spec)

    def constraint_for(self, spec: JsonSpec) -> GrammarMatcher:
        """A fresh grammar state for one sequence (the core calls it on the submitting thread)."""
        return self.grammar().matcher(spec)

    # ---- ------------------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        backend = self.core.backend if self.core is not None else None
        return {
            "model_dir": str(self.model_dir),
            "family": self.family.name,
            "backend": backend.name if backend else None,
            "device": backend.device if backend else None,
            "dtype": backend.dtype if backend else None,
        }

    def close(self) -> None:
        if self.core is not None:
            self.core.close()
