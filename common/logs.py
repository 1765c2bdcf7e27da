"""Logging for the command-line tools: quiet by default, useful with -v, debug with -vv."""

from __future__ import annotations

import logging
import sys

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
