#!/usr/bin/env python3
"""Writes SHA256SUMS for release artifacts: one line per file, in the format `sha256sum -c` checks.

    python3 -m build && python3 .ci/sha256sums.py dist      # writes dist/SHA256SUMS
    cd dist && sha256sum -c SHA256SUMS                       # what a user runs after downloading

Every regular file directly in the folder is listed (sorted by name), except SHA256SUMS itself and hidden files;
the names are bare, so the check runs from inside the folder. Exit 2 when the folder is missing or empty.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

SUMS = "SHA256SUMS"
CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def artifacts(folder: Path) -> list[Path]:
    """The files SHA256SUMS lists: regular files directly in `folder`, not hidden, not SHA256SUMS."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.name != SUMS and not p.name.startswith(".")),
                  key=lambda p: p.name)


def sums_text(folder: Path) -> str:
    """The contents of SHA256SUMS: `HEX  NAME` lines (two spaces: binary and text mode hash alike)."""
    return "".join(f"{sha256_of(path)}  {path.name}\n" for path in artifacts(folder))


def write_sums(folder: Path) -> Path:
    """Writes `folder`/SHA256SUMS (replacing an old one) and returns its path; ValueError when there is nothing."""
    if not artifacts(folder):
        raise ValueError(f"{folder} has no files to list")
    target = folder / SUMS
    tmp = folder / f".{SUMS}.tmp"
    tmp.write_text(sums_text(folder), encoding="ascii")
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sha256sums.py", description="Write SHA256SUMS for the files in a folder.")
    parser.add_argument("folder", nargs="?", default="dist", type=Path, help="the artifacts' folder (default dist)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"sha256sums.py: error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    try:
        target = write_sums(args.folder)
    except ValueError as exc:
        print(f"sha256sums.py: error: {exc}", file=sys.stderr)
        return 2
    print(target.read_text(encoding="ascii"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
