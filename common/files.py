"""Small text files a user names (a prompt, a JSON schema), read with a cap: a device like /dev/zero never ends."""

from __future__ import annotations

from pathlib import Path

from common.errors import InputError


def read_capped_text(path: Path, max_bytes: int, *, param: str, kind: str) -> str:
    """A small text file (a prompt, a JSON schema) read with a cap, as UTF-8: a device like /dev/zero never ends.
    InputError naming the file and `param`; `kind` says what the file should be ("a prompt")."""
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror or exc}", param=param) from None
    if len(data) > max_bytes:
        raise InputError(f"{path}: larger than {max_bytes:,} bytes; {kind} is far shorter", param=param)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text: {exc}", param=param) from None
