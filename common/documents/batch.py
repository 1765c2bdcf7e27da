"""A batch run: every work item prepared (ahead, on a thread), submitted to the engine, and written the moment it
finishes; items already finished in -o DIR are skipped (resume).

One code path for one page or ten thousand: up to `max_batch` items generate together while the next ones are
prepared. Text streamed to a terminal goes one item at a time (interleaved pages would be unreadable).
Presentation is the caller's: it passes a `Progress` (start / token / finish per item).
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from common.documents.outputs import page_record, stored_record_status, unwritable_names, write_combined, write_outputs
from common.documents.postprocess import GroundingStripper
from common.documents.workitems import DEFAULT_DPI, Prepared, WorkItem, prepared_items
from common.engine.requests import RequestHandle
from common.engine.sampling import SamplingParams
from common.errors import DsocrError
from common.model.modes import Mode

log = logging.getLogger("dsocr")


class Progress(Protocol):
    def start(self, item: WorkItem) -> None: ...

    def token(self, live_tokens: int, live_seconds: float) -> None: ...

    def finish(self, item: WorkItem, status: str, tokens: int = 0, seconds: float = 0.0, message: str = "") -> None: ...


@dataclass
class Outcome:
    item: WorkItem
    status: str  # "ok", "skipped", "failed"
    tokens: int = 0
    seconds: float = 0.0
    message: str = ""
    record: dict[str, Any] | None = None  # the item's JSON object (ok and skipped items)
    refused: bool = False  # the engine refused it before it ran (bad input, a token budget that does not fit)


@dataclass
class BatchOptions:
    prompt: str
    mode: Mode
    params: SamplingParams
    out_dir: Path | None = None
    json_lines: bool = False
    stream_text: bool = False  # print text to stdout as it is generated (one item at a time)
    overwrite: bool = False
    dpi: int = DEFAULT_DPI
    prefetch: int = 2  # items prepared ahead of the ones generating
    verbose: int = 0
    max_batch: int = 1  # items generated at once
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, DsocrError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def emit_json(opts: BatchOptions, record: dict[str, Any]) -> None:
    if opts.json_lines:
        opts.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        opts.stdout.flush()


class DocumentGroups:
    """Multi-page documents: the combined PDFNAME.md is written once its last page of this run is done."""

    def __init__(self, items: list[WorkItem], todo: list[WorkItem], opts: BatchOptions) -> None:
        self.opts = opts
        self.members: dict[str, list[WorkItem]] = {}
        for item in items:
            if item.group:
                self.members.setdefault(item.group, []).append(item)
        self.remaining = {g: sum(1 for i in todo if i.group == g) for g in self.members}

    def write_missing(self) -> list[Outcome]:
        """Every page skipped but the combined file missing (or being redone)."""
        out_dir = self.opts.out_dir
        return [
            failure
            for g in self.members
            if out_dir is not None and self.remaining[g] == 0 and not (out_dir / f"{g}.md").is_file()
            for failure in self._write(g)
        ]

    def step(self, item: WorkItem) -> list[Outcome]:
        if self.opts.out_dir is None or not item.group:
            return []
        self.remaining[item.group] -= 1
        return self._write(item.group) if self.remaining[item.group] == 0 else []

    def _write(self, group: str) -> list[Outcome]:
        assert self.opts.out_dir is not None
        try:
            write_combined(self.opts.out_dir, group, self.members[group])
        except OSError as exc:  # e.g. a full disk: the pages are kept, the combined file is reported
            first = self.members[group][0]
            item = WorkItem(first.source, first.kind, group)
            return [Outcome(item, "failed", message=f"cannot write {group}.md: {exc.strerror or exc}")]
        return []


def split_done(items: list[WorkItem], opts: BatchOptions, progress: Progress) -> tuple[list[Outcome], list[WorkItem]]:
    """(done outcomes, items to do), before any work: items whose NAME.json is finished for this item's source are
    skipped (resume), unless --overwrite; a record of another source (or one that names none: an older dsocr's)
    is redone, and the log says so. Items whose output names the file system cannot hold fail here."""
    done: list[Outcome] = []
    todo: list[WorkItem] = []
    refused = unwritable_names(opts.out_dir, items) if opts.out_dir is not None else {}
    for index, item in enumerate(items):
        if index in refused:
            done.append(Outcome(item, "failed", message=refused[index]))
            progress.finish(item, "failed", message=refused[index])
            emit_json(opts, {"source": item.source, "page": item.page, "error": refused[index]})
            continue
        stored, why = (None, "") if opts.out_dir is None or opts.overwrite else stored_record_status(opts.out_dir,
                                                                                                   item)
        if stored is None:
            if why:
                log.warning("%s: redone: %s", item.label, why)
            todo.append(item)
            continue
        done.append(Outcome(item, "skipped", record=stored))
        progress.finish(item, "skipped")
        emit_json(opts, stored)
    return done, todo


class BatchRun:
    """One run's outcomes as they come: items already done are skipped (`todo` is the rest), every outcome is
    reported (progress, then its --json line) and a document's combined file is written after its last page."""

    def __init__(self, items: list[WorkItem], opts: BatchOptions, progress: Progress) -> None:
        self.opts, self.progress = opts, progress
        self.outcomes, self.todo = split_done(items, opts, progress)
        self.groups = DocumentGroups(items, self.todo, opts)
        self.report(self.groups.write_missing())

    def report(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            self.outcomes.append(outcome)
            self.progress.finish(outcome.item, outcome.status, outcome.tokens, outcome.seconds, outcome.message)
            if outcome.status == "failed":
                emit_json(self.opts, {"source": outcome.item.source, "page": outcome.item.page,
                                      "error": outcome.message})
            elif outcome.record is not None:
                emit_json(self.opts, outcome.record)

    def item_done(self, outcome: Outcome) -> None:
        """An item of `todo` has its outcome: reported, and its document's combined file written if it was the
        document's last page of this run."""
        self.report([outcome])
        self.report(self.groups.step(outcome.item))


def finish_item(prepared: Prepared, handle: RequestHandle, opts: BatchOptions, started: float) -> Outcome:
    """The outcome of a finished request, its outputs written to -o DIR (a failure is the item's, never raised)."""
    item = prepared.item
    try:
        if handle.error is not None:
            raise handle.error
        result = handle.result
        assert result is not None
        page = page_record(item, prepared, result, opts.mode.name, opts.params.json_spec is not None, opts.out_dir)
        record = write_outputs(opts.out_dir, item, prepared, page) if opts.out_dir is not None else page.record
    except Exception as exc:
        if opts.verbose and not isinstance(exc, DsocrError):
            traceback.print_exception(exc)
        return Outcome(item, "failed", message=describe_error(exc))
    return Outcome(item, "ok", result.completion_tokens, time.perf_counter() - started, record=record)


def run_batch(engine: Any, items: list[WorkItem], opts: BatchOptions, progress: Progress) -> list[Outcome]:
    """Generates every item (skipping finished ones) and writes outputs; Ctrl-C cancels what runs, then propagates."""
    run = BatchRun(items, opts, progress)
    at_once = 1 if opts.stream_text else max(1, opts.max_batch)
    finished: queue.SimpleQueue[RequestHandle] = queue.SimpleQueue()
    running: dict[int, tuple[Prepared, RequestHandle, float]] = {}  # by handle id, in submission order
    feed = prepared_items(engine, run.todo, opts.prompt, opts.mode, opts.dpi, max(opts.prefetch, at_once))
    tokens = _TokenRate(engine)

    def collect() -> None:
        handle = _next(finished)
        prepared, _, started = running.pop(handle.id)
        progress.token(*tokens.live())
        run.item_done(finish_item(prepared, handle, opts, started))

    try:
        for prepared in feed:
            progress.start(prepared.item)
            try:
                if prepared.error is not None:
                    raise prepared.error
                handle = engine.submit(prepared.inputs, opts.params)
            except Exception as exc:  # refused (bad input, a budget that does not fit): this item only
                refused = prepared.error is None and isinstance(exc, DsocrError)
                run.item_done(Outcome(prepared.item, "failed", message=describe_error(exc), refused=refused))
                continue
            running[handle.id] = (prepared, handle, time.perf_counter())
            handle.add_done_callback(finished.put)
            if opts.stream_text:
                _stream(prepared, handle, opts, progress, many=len(items) > 1)
            while len(running) >= at_once:
                collect()
        while running:
            collect()
    except BaseException:  # Ctrl-C (or a bug): nothing half-written; what finished is kept
        for _, handle, _ in running.values():
            handle.cancel()
        raise
    finally:
        feed.close()
    return run.outcomes


def _next(finished: queue.SimpleQueue[RequestHandle]) -> RequestHandle:
    while True:  # a bounded wait keeps Ctrl-C prompt
        try:
            return finished.get(timeout=0.25)
        except queue.Empty:
            continue


def _stream(prepared: Prepared, handle: RequestHandle, opts: BatchOptions, progress: Progress, many: bool) -> None:
    """Prints the item's text as it is generated (grounding markup dropped: a terminal cannot show boxes)."""
    out = opts.stdout
    if many:
        out.write(f"==> {prepared.item.label} <==\n")
        out.flush()
    stripper = GroundingStripper() if opts.params.json_spec is None else None
    wrote = False
    t0 = time.perf_counter()
    pieces = 0
    try:
        for piece in handle:
            pieces += 1
            shown = stripper.feed(piece) if stripper is not None else piece
            if shown:
                out.write(shown)
                out.flush()
                wrote = True
            progress.token(pieces, time.perf_counter() - t0)
        if stripper is not None and (tail := stripper.flush()):
            out.write(tail)
            wrote = True
    except Exception:  # the item's failure is reported by finish_item
        pass
    finally:
        if wrote:
            out.write("\n")
            out.flush()


class _TokenRate:
    """Tokens decoded so far in this run, from the engine core's step counts (for the progress bar's rate)."""

    def __init__(self, engine: Any) -> None:
        self._core = getattr(engine, "core", None)
        self._start = self._decoded()
        self._t0 = time.perf_counter()

    def _decoded(self) -> int:
        sizes = getattr(self._core, "batch_sizes", None) or {}
        return sum(size * steps for size, steps in sizes.items())

    def live(self) -> tuple[int, float]:
        return self._decoded() - self._start, time.perf_counter() - self._t0

