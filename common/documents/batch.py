"""A batch run: every work item prepared (ahead, on a thread), generated, and written; finished items skipped.

Presentation is the caller's: it passes a `Progress` (start / token / finish per item) and, for a terminal, gets
the text streamed to `stdout` without grounding markup.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from common.documents.outputs import result_record, stored_record, write_combined, write_outputs
from common.documents.postprocess import GroundingStripper
from common.documents.workitems import DEFAULT_DPI, Prefetcher, Prepared, WorkItem, prepared_stream
from common.engine.sampling import SamplingParams, fit_max_tokens
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


@dataclass
class BatchOptions:
    prompt: str
    mode: Mode
    params: SamplingParams
    out_dir: Path | None = None
    json_lines: bool = False
    stream_text: bool = False  # print text deltas to stdout as they arrive
    overwrite: bool = False
    dpi: int = DEFAULT_DPI
    prefetch: int = 2
    verbose: int = 0
    max_tokens_given: bool = False  # the user chose params.max_new_tokens (else it shrinks to fit the context)
    max_batch: int = 1  # items generated at once (text streamed to a terminal always goes one at a time)
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
    """(skipped outcomes, items to do): items whose NAME.json is finished are skipped (resume), unless --overwrite."""
    skipped: list[Outcome] = []
    todo: list[WorkItem] = []
    for item in items:
        stored = None if opts.out_dir is None or opts.overwrite else stored_record(opts.out_dir, item)
        if stored is None:
            todo.append(item)
            continue
        skipped.append(Outcome(item, "skipped", record=stored))
        progress.finish(item, "skipped")
        emit_json(opts, stored)
    return skipped, todo


def report_outcome(outcome: Outcome, opts: BatchOptions, progress: Progress) -> None:
    """Progress, then the item's --json line (its record, or its error)."""
    progress.finish(outcome.item, outcome.status, outcome.tokens, outcome.seconds, outcome.message)
    if outcome.status == "failed":
        emit_json(opts, {"source": outcome.item.source, "page": outcome.item.page, "error": outcome.message})
    elif outcome.record is not None:
        emit_json(opts, outcome.record)


def run_batch(engine: Any, items: list[WorkItem], opts: BatchOptions, progress: Progress) -> list[Outcome]:
    """Generates every item (skipping finished ones) and writes outputs; Ctrl-C propagates after cleanup."""
    outcomes, todo = split_done(items, opts, progress)
    groups = DocumentGroups(items, todo, opts)

    def report(new: list[Outcome]) -> None:
        for outcome in new:
            outcomes.append(outcome)
            report_outcome(outcome, opts, progress)

    report(groups.write_missing())
    if opts.max_batch > 1 and not opts.stream_text:
        _run_batched(engine, todo, opts, progress, report, groups)
        return outcomes
    for prepared in prepared_stream(engine, todo, opts.prompt, opts.mode, opts.dpi, opts.prefetch):
        progress.start(prepared.item)
        report([_run_item(engine, prepared, opts, progress, many=len(items) > 1)])
        report(groups.step(prepared.item))
    return outcomes


def _run_batched(
    engine: Any, todo: list[WorkItem], opts: BatchOptions, progress: Progress, report: Any, groups: DocumentGroups
) -> None:
    """Up to `max_batch` items in the generation loop at once; each is written the moment it finishes."""
    feed = Prefetcher(engine, todo, opts.prompt, opts.mode, opts.dpi, max(opts.prefetch, opts.max_batch))
    running: list[tuple[Prepared, Any, float]] = []
    t0 = time.perf_counter()
    tokens_before = _tokens_decoded(engine.loop)
    try:
        while True:
            while len(running) < opts.max_batch and not feed.finished:
                prepared = feed.get(block=not running)  # wait for work only when nothing else runs
                if prepared is None:
                    break
                progress.start(prepared.item)
                try:
                    if prepared.error is not None:
                        raise prepared.error
                    running.append((prepared, engine.generate(prepared.inputs, params_for(engine, prepared, opts)),
                                    time.perf_counter()))
                except Exception as exc:
                    report([Outcome(prepared.item, "failed", message=describe_error(exc))])
                    report(groups.step(prepared.item))
            if not running:
                if feed.finished:
                    return
                continue
            engine.loop.step()
            progress.token(_tokens_decoded(engine.loop) - tokens_before, time.perf_counter() - t0)
            still = []
            for prepared, generation, started in running:
                if not generation.done:
                    still.append((prepared, generation, started))
                    continue
                report([finish_item(prepared, generation, opts, started)])
                report(groups.step(prepared.item))
            running = still
    except KeyboardInterrupt:
        for _, generation, _ in running:
            generation.cancel()
        raise
    finally:
        feed.close()


def _tokens_decoded(loop: Any) -> int:
    return sum(size * steps for size, steps in loop.batch_sizes.items())


def finish_item(prepared: Prepared, generation: Any, opts: BatchOptions, started: float) -> Outcome:
    """The outcome of a finished generation, its outputs written to -o DIR (a failure is the item's, never raised)."""
    item = prepared.item
    try:
        if generation.error is not None:
            raise generation.error
        result = generation.result
        record = result_record(item, prepared, result, opts.mode.name, json_output=opts.params.json_spec is not None)
        if opts.out_dir is not None:
            record = write_outputs(opts.out_dir, item, prepared, record)
    except Exception as exc:
        if opts.verbose and not isinstance(exc, DsocrError):
            traceback.print_exception(exc)
        return Outcome(item, "failed", message=describe_error(exc))
    return Outcome(item, "ok", result.completion_tokens, time.perf_counter() - started, record=record)


def _run_item(engine: Any, prepared: Prepared, opts: BatchOptions, progress: Progress, many: bool) -> Outcome:
    item = prepared.item
    t0 = time.perf_counter()
    try:
        if prepared.error is not None:
            raise prepared.error
        if opts.stream_text and many:
            opts.stdout.write(f"==> {item.label} <==\n")
            opts.stdout.flush()
        generation = _generate(engine, prepared, opts, progress)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if opts.verbose and not isinstance(exc, DsocrError):
            traceback.print_exception(exc)
        return Outcome(item, "failed", message=describe_error(exc))
    return finish_item(prepared, generation, opts, t0)


def params_for(engine: Any, prepared: Prepared, opts: BatchOptions) -> SamplingParams:
    """The run's sampling parameters with max_new_tokens fitted to this prompt's room in the context."""
    context = engine.config.language.max_position_embeddings
    budget = fit_max_tokens(
        prepared.inputs.prompt_tokens,
        opts.params.max_new_tokens if opts.max_tokens_given else None,
        opts.params.max_new_tokens,
        context,
    )
    return opts.params if budget == opts.params.max_new_tokens else _with_max(opts.params, budget)


def _generate(engine: Any, prepared: Prepared, opts: BatchOptions, progress: Progress) -> Any:
    params = params_for(engine, prepared, opts)
    generation = engine.generate(prepared.inputs, params)
    out = opts.stdout
    t0 = time.perf_counter()
    deltas = 0
    wrote_text = False
    # The terminal cannot show boxes: drop the grounding markup there (-o / --json keep it). JSON goes as is.
    stripper = GroundingStripper() if opts.params.json_spec is None else None
    try:
        for delta in generation:
            deltas += 1
            shown = stripper.feed(delta) if stripper is not None else delta
            if opts.stream_text and shown:
                out.write(shown)
                out.flush()
                wrote_text = True
            progress.token(deltas, time.perf_counter() - t0)
        if opts.stream_text and stripper is not None and (tail := stripper.flush()):
            out.write(tail)
            wrote_text = True
    except KeyboardInterrupt:
        generation.cancel()
        raise
    finally:
        if wrote_text:
            out.write("\n")
            out.flush()
    return generation


def _with_max(params: SamplingParams, max_new_tokens: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_new_tokens=max_new_tokens)
