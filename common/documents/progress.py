"""Progress of a batch on stderr: a rich bar on a terminal, plain lines otherwise (nothing with -q), and the summary
table at the end. The CLI's presentation of `common.documents.batch.Progress`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

from common.documents.batch import Outcome
from common.documents.workitems import WorkItem


class Reporter:
    """Progress on stderr: a rich bar on a terminal, plain lines otherwise, nothing with -q."""

    def __init__(self, total: int, *, quiet: bool, live: bool, stream: IO[str] | None = None) -> None:
        self.total, self.quiet = total, quiet
        self.stream = stream or sys.stderr
        self.done = 0
        self.tokens = 0
        self.gen_seconds = 0.0
        self._progress: Any = None
        self._task: Any = None
        if not quiet and live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.console = Console(file=self.stream)
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}", justify="left"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("starting", total=total, rate="")

    @property
    def rich(self) -> bool:
        return self._progress is not None

    def loading(self, what: str, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=f"loading {what} {done}/{total}")

    def start(self, item: WorkItem) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=_short(item.short_label, 30))

    def token(self, live_tokens: int, live_seconds: float) -> None:
        if self._progress is not None and live_seconds > 0:
            rate = (self.tokens + live_tokens) / (self.gen_seconds + live_seconds)
            self._progress.update(self._task, rate=f"{rate:.1f} tok/s")

    def finish(self, item: WorkItem, status: str, tokens: int = 0, seconds: float = 0.0, message: str = "") -> None:
        self.done += 1
        self.tokens += tokens
        self.gen_seconds += seconds
        if self._progress is not None:
            rate = f"{self.tokens / self.gen_seconds:.1f} tok/s" if self.gen_seconds > 0 else ""
            self._progress.update(self._task, advance=1, rate=rate)
            if status == "failed" and self.total > 1:
                self._progress.console.print(f"[red]failed[/red] {item.label}: {message}", highlight=False)
            return
        if (self.quiet and status != "failed") or (status == "failed" and self.total == 1):
            return  # a single failure is main()'s one error line
        detail = {
            "ok": f"{tokens} tokens in {seconds:.1f} s" + (f" ({tokens / seconds:.1f} tok/s)" if seconds > 0 else ""),
            "skipped": "already done (use --overwrite to redo)",
            "failed": message,
        }[status]
        print(f"[{self.done}/{self.total}] {status} {item.label}: {detail}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def print_summary(
    outcomes: list[Outcome], out_dir: Path | None, stream: IO[str], live: bool, elapsed: float | None = None
) -> None:
    ok = [o for o in outcomes if o.status == "ok"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    failed = [o for o in outcomes if o.status == "failed"]
    tokens = sum(o.tokens for o in ok)
    seconds = sum(o.seconds for o in ok)
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream, width=None if live else 120)
    table = Table(title="dsocr summary", show_lines=False)
    table.add_column("status")
    table.add_column("items", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("time", justify="right")
    table.add_row("ok", str(len(ok)), str(tokens), f"{seconds:.1f} s")
    table.add_row("skipped", str(len(skipped)), "", "")
    table.add_row("failed", str(len(failed)), "", "")
    console.print(table)
    if elapsed and ok:
        console.print(f"{len(ok)} done in {elapsed:.1f} s: {len(ok) / elapsed:.2f} items/s")
    if failed:
        fail_table = Table(title="failed items")
        fail_table.add_column("input", overflow="fold")
        fail_table.add_column("error", overflow="fold")
        for o in failed:
            fail_table.add_row(o.item.label, o.message)
        console.print(fail_table)
    if out_dir is not None and (ok or skipped):
        console.print(f"outputs in {out_dir}")
