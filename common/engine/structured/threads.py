"""llguidance's work bounded: its limits, and the large-stack threads its schema handling runs on (it recurses;
a deep schema must never overflow a thread's stack)."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import llguidance as llg

log = logging.getLogger(__name__)

# llguidance's work and memory per grammar (its defaults in brackets), for validation and every matcher: symbols in
# the grammar (500k), lexer states (250k; 1-2 KB each), lexer fuel when the lexer is built (1M; a pattern such as
# ((a{100}){100}){100} spent 0.7 s and 200 MB there) and per mask (200k; ~14k per ms), Earley items per mask (50k;
# ~20k per ms) and per row (2000).
GRAMMAR_LIMITS: dict[str, int] = {
    "max_grammar_size": 200_000,
    "max_lexer_states": 50_000,
    "initial_lexer_fuel": 200_000,
    "step_lexer_fuel": 100_000,
    "step_max_items": 50_000,
    "max_items_in_row": 2_000,
}
# The stack of the threads that run llguidance's checks and compilations: far more than any schema within the
# limits above needs (a schema at the size limit recursing at every level would need about 40 MiB). Virtual
# memory: only the pages used are resident.
GRAMMAR_THREAD_STACK_BYTES = 256 << 20
GRAMMAR_THREADS = 2


# ------------------------------------------------------------------------------------------ grammar threads

_T = TypeVar("_T")


class _GrammarThreads:
    """A few daemon threads with a large stack (`GRAMMAR_THREAD_STACK_BYTES`) that run llguidance's schema checks
    and compilations, one job at a time each, from a queue. Started on first use; a forked child starts its own."""

    def __init__(self, threads: int, stack_bytes: int) -> None:
        self._count, self._stack_bytes = threads, stack_bytes
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]]
        self._jobs = queue.SimpleQueue()
        self._idents: set[int] = set()
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` on one of the threads; its result, or its exception raised here."""
        if threading.get_ident() in self._idents:  # already on one (a compilation validating its schema)
            return fn(*args)
        self._start()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return future.result()

    def _start(self) -> None:
        with self._lock:
            if self._idents:
                return
            started: list[threading.Thread] = []
            with _STACK_SIZE_LOCK:  # the size applies to threads started while it is set: these only
                try:
                    previous = threading.stack_size(self._stack_bytes)
                except (ValueError, RuntimeError) as exc:  # a platform that cannot set it
                    log.warning("grammar threads keep the default stack size (%s)", exc)
                    previous = None
                try:
                    for i in range(self._count):
                        thread = threading.Thread(target=self._work, name=f"dsocr-grammar-{i}", daemon=True)
                        try:
                            thread.start()
                        except RuntimeError:  # the address space is limited (ulimit -v): one thread, default stack
                            if started or previous is None:
                                break
                            log.warning("grammar threads keep the default stack size (no room for %d MiB)",
                                        self._stack_bytes >> 20)
                            threading.stack_size(previous)
                            previous = None
                            thread = threading.Thread(target=self._work, name=f"dsocr-grammar-{i}", daemon=True)
                            thread.start()
                        started.append(thread)
                finally:
                    if previous is not None:
                        threading.stack_size(previous)
            self._idents = {thread.ident for thread in started if thread.ident is not None}

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller (a pyo3 panic is a BaseException)
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, fn, args

    def _forget(self) -> None:
        """In a forked child: the parent's threads do not exist there."""
        self._jobs = queue.SimpleQueue()
        self._idents = set()
        self._lock = threading.Lock()


_STACK_SIZE_LOCK = threading.Lock()
_GRAMMAR_THREADS = _GrammarThreads(GRAMMAR_THREADS, GRAMMAR_THREAD_STACK_BYTES)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_GRAMMAR_THREADS._forget)


def on_grammar_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Runs `fn(*args)` on a grammar thread (large stack) and returns its result; exceptions pass through."""
    return _GRAMMAR_THREADS.run(fn, *args)


def grammar_limits() -> llg.LLParserLimits:
    """llguidance's limits for validation and matchers (`GRAMMAR_LIMITS`), errors without grammar dumps."""
    return llg.LLParserLimits(verbose_errors=False, **GRAMMAR_LIMITS)


