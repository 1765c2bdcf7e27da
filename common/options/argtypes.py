"""argparse value types shared by the command-line tools: each refuses a bad value with one clear line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_in_range(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text[:40]!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def finite_float(minimum: float | None = None, *, exclusive: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text[:40]!r}")
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'above' if exclusive else 'at least'} {minimum}, got {value}")
        return value

    return parse


def boolean(text: str) -> bool:
    """A yes/no value from an environment variable (1/0, true/false, yes/no, on/off)."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text[:40]!r}")


positive_int = int_in_range(1)
non_negative_int = int_in_range(0)
port_number = int_in_range(1, 65535)


def api_key(text: str) -> str:
    """An API key clients can send: printable ASCII without spaces (HTTP headers carry nothing else reliably, so any
    other key could never match). Empty: no key."""
    if text and not all(33 <= ord(c) <= 126 for c in text):
        bad = next(c for c in text if not 33 <= ord(c) <= 126)
        raise argparse.ArgumentTypeError(f"the key holds {bad!r}: use printable ASCII characters without spaces")
    return text
