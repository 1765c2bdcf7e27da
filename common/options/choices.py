"""User options -> what the engine takes: a `Mode` and `SamplingParams`, the same way for the CLI and the server.

The names users may pick (modes, tasks, backends, devices, dtypes) come from `choices`, the one place both
front ends read them from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from common.files import read_capped_text
from common.model.families import all_mode_names
from common.model.prompt import TASKS

if TYPE_CHECKING:
    pass

DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_PROMPT_FILE_BYTES = 1 << 20


def choices(option: str) -> tuple[str, ...]:
    """The values a user may give for `option` ("mode", "task", "backend", "device", "dtype")."""
    from common.engine.backend import BACKENDS
    from common.model.device import DEVICES

    table = {
        "mode": all_mode_names(),  # every family's presets; the loaded model decides which are valid
        "task": tuple(TASKS),
        "backend": ("auto", *BACKENDS),
        "device": DEVICES,
        "dtype": DTYPES,
    }
    return table[option]


def read_prompt_file(path: Path, max_bytes: int = MAX_PROMPT_FILE_BYTES) -> str:
    """A prompt file's text, read with a cap."""
    return read_capped_text(path, max_bytes, param="prompt_file", kind="a prompt")
