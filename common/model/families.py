"""The model families dsocr runs, each described in one place: DeepSeek-OCR (v1) and DeepSeek-OCR 2.

A family is chosen by config.json's `architectures` (both say `model_type` `deepseek_vl_v2`). Its description
holds everything that is not a tensor shape: the resolution presets and their crop defaults, the sizes its
vision encoder accepts, how a no-crop view is made, how many `<image>` tokens a view gives and in which order
they sit in the prompt, the task prompts and the n-gram recipe. Token counts (common.model.tiling) and the token
layout (each backend's model) both read `layout`, so they cannot disagree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from common.errors import ConfigError, InputError
from common.model.modes import MAX_SIDE, MAX_TILES, SIZE_MULTIPLE, Mode

PATCH_SIZE = 16  # SAM's patch size
DOWNSAMPLE_RATIO = 4  # net_2 and net_3 halve SAM's grid twice: a view of S px gives (S/64)^2 vision tokens

# The authors' prompts (README and run scripts of both repositories; OCR 2 kept them), and dsocr's extract.
TASK_PROMPTS: Mapping[str, str] = MappingProxyType(
    {
        "markdown": "<image>\n<|grounding|>Convert the document to markdown.",
        "ocr": "<image>\nFree OCR.",
        "figure": "<image>\nParse the figure.",
        "describe": "<image>\nDescribe this image in detail.",
        "locate": "<image>\nLocate <|ref|>TEXT<|/ref|> in the image.",
        "grounding": "<image>\n<|grounding|>OCR this image.",
        # Structured output (JSON by a schema): FIELDS names what the schema asks for
        # (common.model.prompt.extract_fields).
        "extract": "<image>\nExtract FIELDS from the document as JSON.",
    }
)


def view_token_side(size: int) -> int:
    """Side of the vision-token grid of one square view of `size` px (the authors' ceil(size / 16 / 4))."""
    return math.ceil((size // PATCH_SIZE) / DOWNSAMPLE_RATIO)


@dataclass(frozen=True)
class TokenLayout:
    """Where one image's vision tokens sit in the prompt, view by view.

    Order: local tiles (when there are any), then the global view, then one `view_seperator` embedding.
    Both families put the tiles first (config.json's `global_view_pos` is not read by the authors' code).
    """

    row_newlines: bool  # an `image_newline` embedding closes every row of a view's token grid
    stitch_tiles: bool  # tiles form one 2-D grid whose rows run across tiles; else they follow tile by tile
    separator: bool = True

    def rows(self, rows: int, columns: int) -> int:
        """Tokens of a rows x columns token grid."""
        return rows * (columns + int(self.row_newlines))

    def local_tokens(self, tile_side: int, crop_grid: tuple[int, int]) -> int:
        columns, rows = crop_grid
        if self.stitch_tiles:
            return self.rows(tile_side * rows, tile_side * columns)
        return columns * rows * self.rows(tile_side, tile_side)

    def image_tokens(self, mode: Mode, crop_grid: tuple[int, int], has_crops: bool) -> int:
        """`<image>` tokens for one image: [local tiles], global view, separator."""
        count = self.rows(view_token_side(mode.global_size), view_token_side(mode.global_size))
        if mode.crop_mode and has_crops:
            count += self.local_tokens(view_token_side(mode.image_size), crop_grid)
        return count + int(self.separator)

    def image_rows(
        self, global_side: int, tile_side: int, crop_grid: tuple[int, int], tiles: int, first: int,
        newline: int, separator: int,
    ) -> np.ndarray:
        """Where one image's tokens come from, in prompt order: rows of the embedding table a backend gathers
        from (`common.engine.backend.Backend.embed_prompt`). The image's views sit in the table from row `first`:
        the global view's global_side^2 tokens (row-major), then each tile's tile_side^2 tokens, tile t being at
        column t % width, row t // width of `crop_grid` (width, height); `newline` and `separator` are the rows
        of image_newline and view_seperator."""
        parts = []
        if tiles:
            width, height, t = crop_grid[0], crop_grid[1], tile_side
            if tiles != width * height:
                raise ValueError(f"{tiles} local views do not fill a {width}x{height} crop grid")
            tile_first = first + global_side * global_side + np.arange(tiles, dtype=np.int64) * t * t
            if self.stitch_tiles:  # one (height*t) x (width*t) grid whose rows run across tiles
                r, c = np.arange(height * t)[:, None], np.arange(width * t)[None, :]
                grid = tile_first[(r // t) * width + c // t] + (r % t) * t + (c % t)
            else:  # tile after tile, each row-major
                grid = (tile_first[:, None] + np.arange(t * t)).reshape(tiles * t, t)
            parts.append(self._close_rows(grid, newline))
        side = global_side
        parts.append(self._close_rows(first + np.arange(side * side, dtype=np.int64).reshape(side, side), newline))
        if self.separator:
            parts.append(np.array([separator], dtype=np.int64))
        return np.concatenate(parts)

    def _close_rows(self, grid: np.ndarray, newline: int) -> np.ndarray:
        """A token grid's rows in order, each closed by the newline row when the layout says so."""
        if self.row_newlines:
            grid = np.concatenate([grid, np.full((grid.shape[0], 1), newline, dtype=np.int64)], axis=1)
        return grid.reshape(-1)


@dataclass(frozen=True)
class NGramRecipe:
    """The authors' repetition guard: Hugging Face `no_repeat_ngram_size` over the whole sequence in infer()
    (`size`, 35 with eval_mode), and their vLLM scripts' windowed processor."""

    size: int = 20
    eval_size: int = 35
    vllm_size: int = 30
    vllm_window: int = 90


@dataclass(frozen=True, eq=False)  # eq=False: families are singletons, compared (and hashed) by identity
class ModelFamily:
    name: str  # what `Mode.family` holds
    title: str
    architecture: str  # config.json `architectures`
    repo: str  # Hugging Face repo id
    modes: Mapping[str, Mode]
    default_mode: str
    layout: TokenLayout
    squash_max_side: int  # a no-crop view up to this side is the image stretched to a square; larger ones are padded
    view_sizes: tuple[int, ...] = ()  # global-view sides the vision encoder accepts; () = any multiple of 64
    tile_sizes: tuple[int, ...] = ()  # tile sides it accepts; () = any multiple of 64
    prompts: Mapping[str, str] = field(default_factory=lambda: TASK_PROMPTS)
    ngram: NGramRecipe = NGramRecipe()

    @property
    def default(self) -> Mode:
        return self.modes[self.default_mode]


def _presets(family: str, *modes: Mode) -> Mapping[str, Mode]:
    assert all(m.family == family for m in modes)
    return MappingProxyType({m.name: m for m in modes})


# v1: the presets of run_dpsk_ocr.py; crops 2..9 as dynamic_preprocess's defaults in the HF code.
DEEPSEEK_OCR = ModelFamily(
    name="deepseek-ocr",
    title="DeepSeek-OCR",
    architecture="DeepseekOCRForCausalLM",
    repo="deepseek-ai/DeepSeek-OCR",
    modes=_presets(
        "deepseek-ocr",
        Mode("tiny", 512, 512, False),
        Mode("small", 640, 640, False),
        Mode("base", 1024, 1024, False),
        Mode("large", 1280, 1280, False),
        Mode("gundam", 1024, 640, True),
    ),
    default_mode="gundam",
    layout=TokenLayout(row_newlines=True, stitch_tiles=True),
    squash_max_side=640,
)

# OCR 2: one official setting (global 1024 + 768 tiles, 2..6 crops: "(0-6)x768x768 + 1x1024x1024"); the
# no-crop paths of its infer() at the two sizes its encoder has learned queries for. Names follow v1's
# presets of the same role, so `--mode gundam|base|small` means the same kind of view with either model.
DEEPSEEK_OCR_2 = ModelFamily(
    name="deepseek-ocr-2",
    title="DeepSeek-OCR 2",
    architecture="DeepseekOCR2ForCausalLM",
    repo="deepseek-ai/DeepSeek-OCR-2",
    modes=_presets(
        "deepseek-ocr-2",
        Mode("gundam", 1024, 768, True, 2, 6, family="deepseek-ocr-2"),
        Mode("base", 1024, 1024, False, 2, 6, family="deepseek-ocr-2"),
        Mode("small", 768, 768, False, 2, 6, family="deepseek-ocr-2"),
    ),
    default_mode="gundam",
    layout=TokenLayout(row_newlines=False, stitch_tiles=False),
    squash_max_side=768,
    view_sizes=(768, 1024),
    tile_sizes=(768,),
    ngram=NGramRecipe(vllm_size=20),
)

FAMILIES: Mapping[str, ModelFamily] = MappingProxyType({f.name: f for f in (DEEPSEEK_OCR, DEEPSEEK_OCR_2)})
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def all_mode_names() -> tuple[str, ...]:
    """Every preset name of every family, in order (for a command line that does not know the model yet)."""
    return tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.modes))


def family_for_config(data: dict[str, Any], path: Path | str = "config.json") -> ModelFamily:
    """The family config.json's `architectures` names; ConfigError names the value when it is unknown."""
    known = ", ".join(_BY_ARCHITECTURE)
    value = data.get("architectures")
    if value is None:
        raise ConfigError(f"{path}: key 'architectures' is missing (expected one of {known})")
    names = value if isinstance(value, list) else [value]
    found = [_BY_ARCHITECTURE[n] for n in names if isinstance(n, str) and n in _BY_ARCHITECTURE]
    if len(found) != 1:
        raise ConfigError(f"{path}: key 'architectures' = {value!r} is not a supported model (expected one of {known})")
    return found[0]


def family_of_model_dir(model_dir: str | Path) -> ModelFamily:
    """Reads only config.json's `architectures` (cheap: no weights, no full config parse)."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config.json not found") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read config.json ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return family_for_config(data, path)


# ---- resolving a mode: a family's preset, optionally overridden field by field ----------------------------------


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
    family = family or DEEPSEEK_OCR
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
