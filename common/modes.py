"""Resolution modes: the official presets (run_dpsk_ocr.py) and validated custom settings.

`base_size` is the side of the global view, `image_size` the side of each local tile. Without crop mode the
official code only uses `image_size` (the global view is image_size x image_size), so a resolved non-crop Mode
always has base_size == image_size.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import InputError

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
    min_crops: int = 2  # dynamic_preprocess defaults in the authors' HF code (their vLLM config uses max 6)
    max_crops: int = 9


MODES: dict[str, Mode] = {
    "tiny": Mode("tiny", 512, 512, False),
    "small": Mode("small", 640, 640, False),
    "base": Mode("base", 1024, 1024, False),
    "large": Mode("large", 1280, 1280, False),
    "gundam": Mode("gundam", 1024, 640, True),
}


def _check_size(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be an integer, got {value!r}", param=what)
    if value <= 0 or value % SIZE_MULTIPLE or value > MAX_SIDE:
        raise InputError(
            f"{what} must be a positive multiple of {SIZE_MULTIPLE} up to {MAX_SIDE}, got {value}", param=what
        )


def _check_count(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be an integer, got {value!r}", param=what)
    if value < 1 or value > MAX_TILES:
        raise InputError(f"{what} must be between 1 and {MAX_TILES}, got {value}", param=what)


def resolve_mode(
    name: str = "gundam",
    *,
    base_size: int | None = None,
    image_size: int | None = None,
    crop_mode: bool | None = None,
    min_crops: int | None = None,
    max_crops: int | None = None,
) -> Mode:
    """A preset, optionally overridden field by field; InputError names the bad value."""
    key = name.strip().lower()
    if key not in MODES:
        raise InputError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}", param="mode")
    preset = MODES[key]
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
    _check_count("min_crops", lo)
    _check_count("max_crops", hi)
    if lo > hi:
        raise InputError(f"min_crops ({lo}) must not exceed max_crops ({hi})", param="min_crops")
    mode = Mode(key, base, tile, crop, lo, hi)
    if overridden and mode != preset:
        mode = Mode(f"{key}-custom", base, tile, crop, lo, hi)
    return mode
