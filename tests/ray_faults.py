"""Generation actors for tests/test_cluster.py that log what they write and kill themselves on cue.

The Ray workers import this module by name, so it lives apart from the test module. Logs and kill markers sit
next to the job's output folder.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from common.documents.cluster import PageGenerator
from common.documents.workitems import Prepared

KILL_MID_PAGE = "doc_page002"  # SIGKILL once this page is queued, before it is written (once per output folder)
KILL_AFTER_WRITE = "doc_page003"  # SIGKILL once this page's outputs are written, before its result is returned


class RecordingGenerator(PageGenerator):
    """Logs `NAME PID BATCH` for every page it writes (BATCH: the most pages its loop has decoded together)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writing = threading.Lock()  # a kill waits for a running write: the log is what reached the disk
        assert self.opts.out_dir is not None
        self.root = self.opts.out_dir.parent

    def _complete(self, prepared: Prepared, handle: Any, started: float) -> Any:
        with self._writing:
            outcome = super()._complete(prepared, handle, started)
            if outcome.status == "ok":
                batch = max((size for size, steps in self.engine.core.batch_sizes.items() if steps), default=0)
                with open(self.root / "writes.log", "a", encoding="utf-8") as log:
                    log.write(f"{prepared.item.name} {os.getpid()} {batch}\n")
        return outcome

    def _kill_once(self, marker_name: str) -> None:
        marker = self.root / marker_name
        if marker.exists():
            return
        with self._writing:
            marker.write_text(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class BatchingGenerator(RecordingGenerator):
    """A fresh job's first page waits (up to 30 s) for a second one before both are queued.

    Otherwise whether two calls overlap depends on how fast the CPU tasks prepare pages on a busy machine, and the
    test of a shared decode batch would be a test of timing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._arrivals = 0
        self._arrived = threading.Lock()
        self._second = threading.Event()
        assert self.opts.out_dir is not None
        if any(self.opts.out_dir.rglob("*.json")):  # a resumed job: nothing to pair with
            self._second.set()

    def _start(self, prepared: Prepared, error: str | None) -> Any:
        if error is None:
            with self._arrived:
                self._arrivals += 1
                first = self._arrivals == 1
            if first:
                self._second.wait(30.0)
            else:
                self._second.set()
        return super()._start(prepared, error)


class KillingGenerator(RecordingGenerator):
    """Dies (SIGKILL) while one page is being generated and right after writing another, once each."""

    def _submitted(self, prepared: Prepared, handle: Any) -> None:
        if prepared.item.name == KILL_MID_PAGE:
            self._kill_once("killed-mid-page.pid")

    def _complete(self, prepared: Prepared, handle: Any, started: float) -> Any:
        outcome = super()._complete(prepared, handle, started)
        if prepared.item.name == KILL_AFTER_WRITE:
            self._kill_once("killed-after-write.pid")
        return outcome


class UnloadableGenerator(PageGenerator):
    """An actor whose model cannot be loaded on its node (e.g. --model names a folder only the driver has)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from common.errors import ModelNotFoundError

        raise ModelNotFoundError("model directory /nowhere does not exist")
