"""Logging for the command-line tools: quiet by default, useful with -v, debug with -vv."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

_NOISY = ("httpx", "huggingface_hub", "urllib3", "filelock", "PIL")


def setup_logging(
    verbose: int, default: int = logging.WARNING, fmt: str = "%(levelname)s %(name)s: %(message)s"
) -> None:
    """-v: info, -vv: debug (third-party libraries too); otherwise `default` for dsocr, warnings for libraries."""
    level = default if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    level = min(level, default)
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    if verbose < 2:
        for noisy in _NOISY:
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class RepeatFilter(logging.Filter):
    """Lets the same message (logger, level and format string) through at most `burst` times per `window_s`
    seconds, then once more with the count of those it held back: a flood of identical errors (a client
    hammering the server, a socket error repeated on every accept) cannot fill the disk or drown the useful
    lines."""

    def __init__(self, burst: int = 5, window_s: float = 60.0, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # key -> [window start, passed, held back]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            if len(self._seen) > 10_000:  # distinct messages are few; this only bounds a pathological caller
                self._seen.clear()
            entry = self._seen.setdefault(key, [now, 0, 0])
            if now - entry[0] >= self.window_s:
                held = int(entry[2])
                entry[:] = [now, 0, 0]
                if held:
                    record.msg = f"{record.msg} (and {held} more like it in the last {self.window_s:g} s)"
            entry[1] += 1
            if entry[1] > self.burst:
                entry[2] += 1
                return False
            return True


def quiet_repeats(*logger_names: str, burst: int = 5, window_s: float = 60.0) -> RepeatFilter:
    """Installs one RepeatFilter on the handlers of the root logger and of the named loggers."""
    repeat = RepeatFilter(burst, window_s)
    for name in ("", *logger_names):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(repeat)
    return repeat
