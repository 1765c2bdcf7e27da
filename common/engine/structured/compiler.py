"""`GrammarCompiler` (one per model: llguidance's view of the tokenizer and the compiled grammars, cached within a
byte budget) and `GrammarMatcher` (the grammar state of one sequence)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cachetools
import llguidance as llg
import llguidance.numpy as llg_numpy
import numpy as np

from common.engine.structured.masks import allocate_masks, mask_width
from common.engine.structured.shape import schema_shape
from common.engine.structured.spec import JsonSpec, grammar_for, is_panic, one_line, panic_message, probed_matcher
from common.engine.structured.threads import on_grammar_thread
from common.errors import ConfigError, ModelNotFoundError
from common.memory import rss_bytes

# The compiled grammars kept for reuse: at most this many, within this many bytes (each entry's size is estimated
# when it is compiled).
DEFAULT_MAX_CACHED = 32
DEFAULT_CACHE_BYTES = 512 << 20


# ---------------------------------------------------------------------------------------------- matching


class GrammarMatcher:
    """The grammar state of one sequence. Not thread-safe; one per sequence (from `GrammarCompiler.matcher`).

    Per step: `fill_mask(row)` before sampling, `consume(token_id)` after. EOS is in the mask only while the
    JSON is complete (`eos_allowed`). Once `finished`, EOS is the only id allowed; a decode loop may end the
    sequence right there. After a failed `consume` the matcher stays in `error` and allows only EOS. A panic of
    the engine is contained the same way (this sequence fails, the others in its batch go on).
    """

    def __init__(self, matcher: llg.LLMatcher, spec: JsonSpec, vocab_size: int, eos_id: int) -> None:
        self._matcher = matcher
        self.spec = spec
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._eos_consumed = False
        self._failure: str | None = None  # set when the engine panicked

    def fill_mask(self, row: np.ndarray) -> None:
        """Writes the allowed-token bitmask for the next token into `row` (int32, C-contiguous)."""
        rows = row[None, :] if row.ndim == 1 else row  # a view, never a copy: the writes must land in `row`
        _check_mask_rows(rows, self.vocab_size, 1)
        if self._failure is None:
            try:
                llg_numpy.fill_next_token_bitmask(self._matcher, rows)
                return
            except BaseException as exc:
                if not is_panic(exc):
                    raise
                self._failure = panic_message(exc)
        rows[0] = 0
        rows[0].view(np.uint32)[self.eos_id >> 5] = np.uint32(1 << (self.eos_id & 31))

    def consume(self, token_id: int) -> bool:
        """Advances over the sampled token; False (and `error` set) when the grammar does not allow it."""
        if self._failure is not None:
            return False
        try:
            accepted = bool(self._matcher.consume_token(int(token_id)))
        except BaseException as exc:
            if not is_panic(exc):
                raise
            self._failure = panic_message(exc)
            return False
        if accepted and int(token_id) == self.eos_id:
            self._eos_consumed = True
        return accepted

    def _failed(self) -> bool:
        return self._failure is not None or self._matcher.is_error()

    @property
    def eos_allowed(self) -> bool:
        """True only when the output so far is complete JSON matching the schema."""
        return not self._eos_consumed and not self._failed() and self._matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """The JSON is complete and nothing but EOS can follow (or EOS was consumed)."""
        return not self._failed() and (self._eos_consumed or self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a token outside the grammar was consumed), else None."""
        if self._failure is not None:
            return self._failure
        return one_line(self._matcher.get_error()) if self._matcher.is_error() else None


def _check_mask_rows(masks: np.ndarray, vocab_size: int, rows: int) -> None:
    width = mask_width(vocab_size)
    if masks.dtype != np.int32 or masks.ndim != 2 or masks.shape[1] != width or masks.shape[0] < rows:
        raise ValueError(
            f"mask must be int32 [{rows}+, {width}] (vocab {vocab_size}), got {masks.dtype} {list(masks.shape)}"
        )
    if not masks.flags["C_CONTIGUOUS"]:
        raise ValueError("mask must be C-contiguous")


# A compiled grammar's size when the process did not grow measurably while compiling it (its memory came from
# freed heap): this much, plus this much per character of the schema.
_MIN_ENTRY_BYTES = 1 << 20
_BYTES_PER_SCHEMA_CHAR = 64


def entry_bytes_floor(spec: JsonSpec) -> int:
    """The least a compiled grammar of `spec` is taken to hold in the cache."""
    return _MIN_ENTRY_BYTES + _BYTES_PER_SCHEMA_CHAR * len(spec.schema_text)


@dataclass(frozen=True)
class _Compiled:
    """A compiled, probed grammar (never consumed from: sequences get copies) and its estimated size: what the
    process grew by while compiling and probing it, at least `entry_bytes_floor`."""

    matcher: llg.LLMatcher
    nbytes: int


class GrammarCompiler:
    """llguidance's tokenizer for one model plus compiled grammars, shared by every sequence (thread-safe).

    `vocab_size` is the model's (`config.language.vocab_size`): masks have that width, and ids past the
    tokenizer's own vocabulary (embedding rows no token uses) are never allowed. A grammar is compiled and probed
    (`probed_matcher`) on a grammar thread, so its first mask is paid for there and a schema that cannot be
    enforced is an InputError naming its field before any sequence uses it.
    """

    def __init__(
        self,
        tokenizer_json: str,
        *,
        eos_id: int,
        vocab_size: int,
        max_cached: int = DEFAULT_MAX_CACHED,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
        threads: int | None = None,
    ) -> None:
        try:  # llguidance's end-of-grammar token is the model's EOS, so "stop" in its masks is `eos_id`
            self._tokenizer = llg.LLTokenizer(
                tokenizer_json, n_vocab=vocab_size, eos_token=eos_id, slices=llg.LLTokenizer.json_slices()
            )
        except ValueError as exc:
            raise ConfigError(f"tokenizer.json does not fit the model (vocab_size {vocab_size}): {exc}") from None
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.mask_width = mask_width(vocab_size)
        self._threads = threads
        self._executor: llg.LLExecutor | None = None
        self.max_cached = max_cached
        self._compiled: cachetools.LRUCache[str, _Compiled] = cachetools.LRUCache(
            maxsize=max_cache_bytes, getsizeof=lambda entry: entry.nbytes
        )
        self._lock = threading.Lock()

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, *, eos_id: int | None = None, vocab_size: int | None = None, **kwargs: Any
    ) -> GrammarCompiler:
        """From a model directory; `eos_id` / `vocab_size` default to its tokenizer files and config.json."""
        from common.model.config import load_config
        from common.model.tokenizer import Tokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        try:
            tokenizer_json = path.read_text(encoding="utf-8")
        except OSError:
            raise ModelNotFoundError(f"no readable tokenizer.json in {model_dir}") from None
        if eos_id is None:
            eos_id = Tokenizer.from_dir(model_dir).eos_id
        if vocab_size is None:
            vocab_size = load_config(model_dir).language.vocab_size
        return cls(tokenizer_json, eos_id=eos_id, vocab_size=vocab_size, **kwargs)

    # The compiled grammars: an LRU bound to `max_cached` schema texts and to `max_cache_bytes` (each entry's size
    # as estimated when it was compiled; one larger than the whole budget is used, not kept). Looked up and stored
    # under the lock, compiled outside it on a grammar thread (two threads may compile one schema at once; the
    # last stored is kept). An error is raised, never cached.
    def _compiled_matcher(self, spec: JsonSpec) -> llg.LLMatcher:
        with self._lock:
            entry = self._compiled.get(spec.schema_text)
        if entry is None:
            entry = on_grammar_thread(self._compile, spec)
            with self._lock:
                with contextlib.suppress(ValueError):  # larger than the whole budget
                    self._compiled[spec.schema_text] = entry
                while len(self._compiled) > self.max_cached:
                    self._compiled.popitem()
        return entry.matcher

    @property
    def cache_bytes(self) -> int:
        """The estimated size of the compiled grammars kept."""
        with self._lock:
            return int(self._compiled.currsize)

    def _compile(self, spec: JsonSpec) -> _Compiled:
        """Compiles and probes a spec's grammar with the model's vocabulary (on a grammar thread); InputError naming
        the spec's field when llguidance refuses it, no JSON value matches it, or it is too costly to enforce."""
        before = rss_bytes()
        grammar = spec.grammar or grammar_for(spec.schema, spec.where)
        patterns = schema_shape(spec.schema, spec.where).patterns
        compiled = probed_matcher(self._tokenizer, self.eos_id, self.vocab_size, grammar, patterns, spec.where)
        grown = rss_bytes() - before if before else 0
        return _Compiled(compiled, max(grown, entry_bytes_floor(spec)))

    def matcher(self, spec: JsonSpec) -> GrammarMatcher:
        """A fresh matcher for one sequence; the grammar is compiled once per schema text, then copied."""
        return GrammarMatcher(self._compiled_matcher(spec).deep_copy(), spec, self.vocab_size, self.eos_id)

    def cached(self, spec: JsonSpec) -> bool:
        with self._lock:
            return spec.schema_text in self._compiled

    def allocate_masks(self, batch_size: int) -> np.ndarray:
        return allocate_masks(batch_size, self.vocab_size)

    def fill_masks(
        self, matchers: Sequence[GrammarMatcher | None], masks: np.ndarray, *, parallel: bool = False
    ) -> None:
        """Row i of `masks` [>= len(matchers), mask_width] gets matcher i's mask; None rows allow every id.

        Each mask is computed outside the GIL. `parallel` spreads them over llguidance's thread pool, which pays
        only with idle cores to spare (compare both with benchmarks/bench_structured.py).
        """
        _check_mask_rows(masks, self.vocab_size, len(matchers))
        work = [(m._matcher, i) for i, m in enumerate(matchers) if m is not None]
        for i, m in enumerate(matchers):
            if m is None:
                masks[i] = -1
        if parallel and work:
            llg_numpy.fill_next_token_bitmask_par(self._pool(), work, masks)
        else:
            for matcher, i in work:
                llg_numpy.fill_next_token_bitmask(matcher, masks, i)

    def _pool(self) -> llg.LLExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = llg.LLExecutor(self._threads)
            return self._executor
