"""Resolution modes: a model family's presets (common.families) and validated custom settings.

`base_size` is the side of the global view, `image_size` the side of each local tile. Without crop mode the
official code only uses `image_size` (the global view is image_size x image_size), so a resolved non-crop Mode
always has base_size == image_size. A Mode names the family it was resolved for, so the views and token
counts made from it follow that family's rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.errors import InputError

if TYPE_CHECKING:
    from common.families import ModelFamily

# SAM downsamples by 16 (patches) then 4 (net_2, net_3): a multiple of 64 gives a whole token grid.
SIZE_MULTIPLE = 64
MAX_SIDE = 4096  # far above the largest preset; keeps a typo from allocating a giant view
MAX_TILES = 64


@dataclass(frozen=True)
class Mode:
    name: str
    base_size: int
    image_size: int
    crop_mode: bool
    min_crops: int = 2  # dynamic_preprocess defaults in the authors' v1 HF code (their vLLM config uses max 6)
    max_crops: int = 9
    family: str = "deepseek-ocr"  # common.families name

    @property
    def global_size(self) -> int:
        """Side of the global view: base_size with crops, else image_size (as the official code reads them)."""
        return self.base_size if self.crop_mode else self.image_size


def __getattr__(name: str) -> Any:
    # `MODES`: DeepSeek-OCR's presets, kept for callers written before model families existed.
    if name == "MODES":
        from common.families import DEEPSEEK_OCR

        return DEEPSEEK_OCR.modes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_size(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be an integer, got {value!r}", param=what)
    if value <= 0 or value % SIZE_MULTIPLE or value > MAX_SIDE:
        raise InputError(
            f"{what} must be a positive multiple of {SIZE_MULTIPLE} up to {MAX_SIDE}, got {value}", param=what
        )


def _check_family_size(what: str, value: int, allowed: tuple[int, ...], family: ModelFamily, role: str) -> None:
    if allowed and value not in allowed:
        sizes = " or ".join(str(s) for s in allowed)
        raise InputError(
            f"{family.title} {role} must be {sizes} px (what its encoder takes), got {what} {value}", param=what
        )


def _check_count(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be an integer, got {value!r}", param=what)
    if value < 1 or value > MAX_TILES:
        raise InputError(f"{what} must be between 1 and {MAX_TILES}, got {value}", param=what)


def resolve_mode(
    name: str | None = None,
    *,
    family: ModelFamily | None = None,
    base_size: int | None = None,
    image_size: int | None = None,
    crop_mode: bool | None = None,
    min_crops: int | None = None,
    max_crops: int | None = None,
) -> Mode:
    """A preset of `family` (default DeepSeek-OCR; no name: its default preset), optionally overridden field by
    field; InputError names the bad value."""
    if family is None:
        from common.families import DEEPSEEK_OCR

        family = DEEPSEEK_OCR
    key = (family.default_mode if name is None else name).strip().lower()
    if key not in family.modes:
        raise InputError(
            f"unknown mode {name!r} for {family.title}; choose one of {', '.join(family.modes)}", param="mode"
        )
    preset = family.modes[key]
    # The values the caller gave are checked first, so an error names the option actually set.
    for what, given in (("base_size", base_size), ("image_size", image_size)):
        if given is not None:
            _check_size(what, given)
    for what, given in (("min_crops", min_crops), ("max_crops", max_crops)):
        if given is not None:
            _check_count(what, given)
    overridden = any(v is not None for v in (base_size, image_size, crop_mode, min_crops, max_crops))
    crop = preset.crop_mode if crop_mode is None else bool(crop_mode)
    base = preset.base_size if base_size is None else base_size
    tile = preset.image_size if image_size is None else image_size
    if not crop:
        # Without crops only one size exists; take whichever the caller set.
        if base_size is not None and image_size is None:
            tile = base
        elif image_size is not None and base_size is None:
            base = tile
        elif base != tile:
            if base_size is not None and image_size is not None:
                raise InputError(
                    f"without crop mode the global view is image_size x image_size; base_size {base}"
                    f" must equal image_size {tile} (or enable crop mode)",
                    param="base_size",
                )
            base = tile = base if base_size is not None else tile
    lo = preset.min_crops if min_crops is None else min_crops
    hi = preset.max_crops if max_crops is None else max_crops
    _check_size("base_size", base)
    _check_size("image_size", tile)
    if crop:
        _check_family_size("base_size", base, family.view_sizes, family, "global views")
        _check_family_size("image_size", tile, family.tile_sizes, family, "tiles")
    else:
        _check_family_size("image_size", tile, family.view_sizes, family, "views")
    _check_count("min_crops", lo)
    _check_count("max_crops", hi)
    if lo > hi:
        raise InputError(f"min_crops ({lo}) must not exceed max_crops ({hi})", param="min_crops")
    mode = Mode(key, base, tile, crop, lo, hi, family.name)
    if overridden and mode != preset:
        mode = Mode(f"{key}-custom", base, tile, crop, lo, hi, family.name)
    return mode
