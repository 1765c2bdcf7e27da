"""The limits as the README and docs/server.md state them are the server's own defaults (one table each, consistent
with --help)."""

from __future__ import annotations

import re

import pytest

from server import build_parser
from tests.conftest import ROOT


def parser_defaults() -> dict[str, object]:
    return {option: action.default for action in build_parser()._actions for option in action.option_strings}


def table_defaults(text: str, default_column: int) -> dict[str, str]:
    """`--flag` -> the default column's text, for every table row whose first cell is a `--flag`."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.match(r"`(--[a-z-]+)", cells[0]) if cells else None
        if match and len(cells) > default_column:
            rows[match.group(1)] = cells[default_column]
    return rows


def as_number(text: str) -> float | None:
    match = re.match(r"^([0-9][0-9,]*(?:\.[0-9]+)?)\b", text)
    return float(match.group(1).replace(",", "")) if match else None


@pytest.mark.parametrize(("document", "column"), [("README.md", 1), ("docs/server.md", 2)])
def test_documented_limits_are_the_defaults(document: str, column: int) -> None:
    defaults = parser_defaults()
    rows = table_defaults((ROOT / document).read_text(), column)
    limits = {flag: text for flag, text in rows.items() if flag.startswith(("--max-", "--fetch-", "--render-"))}
    assert len(limits) >= 10, f"{document}: the limits table is missing"
    for flag, text in limits.items():
        assert flag in defaults, f"{document} documents {flag}, which the server does not have"
        stated, actual = as_number(text), defaults[flag]
        if actual is None:  # decided at start-up (--max-batch, --max-context): documented in words
            continue
        assert stated is not None and stated == pytest.approx(float(actual)), f"{document}: {flag} {text!r} vs {actual}"
    server_limits = {flag for flag, value in defaults.items()
                     if flag.startswith(("--max-", "--fetch-", "--render-")) and value is not None}
    assert server_limits <= set(limits), f"{document} leaves out {sorted(server_limits - set(limits))}"
