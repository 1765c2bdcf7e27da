"""User options -> what the engine takes: a `Mode` and `SamplingParams`, the same way for the CLI and the server.

The names users may pick (modes, tasks, backends, devices, dtypes) come from `choices`, the one place both
front ends read them from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import InputError
from common.families import ModelFamily, all_mode_names
from common.limits import check_stop_strings, read_capped_text
from common.modes import Mode, resolve_mode
from common.prompt import TASKS
from common.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingParams

if TYPE_CHECKING:
    from common.structured import JsonSpec

DTYPES = ("auto", "float32", "bfloat16", "float16")
# A bound far above any model context, so an absurd value is refused before anything is allocated.
MAX_NEW_TOKENS_BOUND = 1 << 20
MAX_PROMPT_FILE_BYTES = 1 << 20


def choices(option: str) -> tuple[str, ...]:
    """The values a user may give for `option` ("mode", "task", "backend", "device", "dtype")."""
    from common.backend import BACKENDS
    from common.device import DEVICES

    table = {
        "mode": all_mode_names(),  # every family's presets; the loaded model decides which are valid
        "task": tuple(TASKS),
        "backend": ("auto", *BACKENDS),
        "device": DEVICES,
        "dtype": DTYPES,
    }
    return table[option]


@dataclass(frozen=True)
class ModeOptions:
    """A mode preset and the per-field overrides a user may give (None = the model family's default preset /
    the preset's value)."""

    mode: str | None = None
    base_size: int | None = None
    image_size: int | None = None
    crop_mode: bool | None = None
    min_crops: int | None = None
    max_crops: int | None = None

    def resolve(self, family: ModelFamily | None = None) -> Mode:
        """The Mode for `family` (the loaded model's; None: DeepSeek-OCR), whose presets and limits apply."""
        return resolve_mode(
            self.mode,
            family=family,
            base_size=self.base_size,
            image_size=self.image_size,
            crop_mode=self.crop_mode,
            min_crops=self.min_crops,
            max_crops=self.max_crops,
        )


def stop_strings(stop: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Stop strings as given, empty ones left out (an empty string would stop at once), within the limits."""
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    kept = tuple(s for s in items if s)
    check_stop_strings(kept)
    return kept


@dataclass(frozen=True)
class SamplingOptions:
    """Generation options as users give them; None = the default (greedy, as the official code)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | tuple[str, ...] | None = None
    no_repeat_ngram_size: int | None = None
    ngram_window: int | None = None
    json_spec: JsonSpec | None = None  # JSON output (common.structured); None = free text

    def resolve(self, default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> SamplingParams:
        """SamplingParams; InputError naming the option for a bad value. max_tokens is capped by the default."""
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_NEW_TOKENS_BOUND:
            raise InputError(
                f"max_tokens must be between 1 and {MAX_NEW_TOKENS_BOUND}, got {self.max_tokens}", param="max_tokens"
            )
        extra: dict[str, int] = {}
        if self.no_repeat_ngram_size is not None:
            extra["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.ngram_window is not None:
            extra["ngram_window"] = self.ngram_window
        return SamplingParams(
            max_new_tokens=min(self.max_tokens or default_max_tokens, default_max_tokens),
            temperature=0.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop_strings(self.stop),
            json_spec=self.json_spec,
            **extra,
        )


def read_prompt_file(path: Path, max_bytes: int = MAX_PROMPT_FILE_BYTES) -> str:
    """A prompt file's text, read with a cap."""
    return read_capped_text(path, max_bytes, param="prompt_file", kind="a prompt")
