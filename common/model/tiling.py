"""Views of one image, bit-exact with the official `infer()`: global view, local tiles, normalisation.

Every resize goes through Pillow's own resampler (the official code uses it; another implementation would
not be byte-identical). Pixels are normalised as ToTensor + Normalize(0.5, 0.5) in float32, then rounded to
bfloat16 (infer() casts the pixels to bf16) and handed to the backends as float32 arrays holding those
bf16 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from common.model.families import DEEPSEEK_OCR, family_named
from common.model.inputs import ImageInput
from common.model.modes import Mode

# Normalize(mean=0.5): the official pad colour is tuple(int(x * 255) for x in mean).
PAD_COLOR = (127, 127, 127)


@dataclass
class TiledImage:
    global_view: Image.Image
    tiles: list[Image.Image]
    crop_grid: tuple[int, int]  # (width tiles, height tiles); (1, 1) without tiles


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """The official candidate list: a set of (i, j) with min <= i*j <= max, stable-sorted by i*j.

    Built and sorted exactly like dynamic_preprocess, so grids with the same product come in the same order
    (CPython's set order for small int tuples is deterministic) and ties resolve the same way.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def choose_crop_grid(width: int, height: int, min_num: int, max_num: int, tile_size: int) -> tuple[int, int]:
    """find_closest_aspect_ratio: the grid whose aspect is closest to the image's; on an exact tie the later
    (larger) grid wins only if the image has more than half the pixels that grid's tiles hold."""
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for grid in candidate_grids(min_num, max_num):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff = diff
            best = grid
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * grid[0] * grid[1]:
            best = grid
    return best


def _cut_tiles(image: Image.Image, grid: tuple[int, int], tile_size: int) -> list[Image.Image]:
    columns, rows = grid
    resized = image.resize((tile_size * columns, tile_size * rows), Image.Resampling.BICUBIC)
    return [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(columns)
    ]


def _pad(image: Image.Image, size: int) -> Image.Image:
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BICUBIC, color=PAD_COLOR)


def tile_image(image: Image.Image, mode: Mode) -> TiledImage:
    """The views infer() builds for one RGB image, by the rules of the family `mode` was resolved for."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if not mode.crop_mode:
        size = mode.image_size  # the official non-crop path only looks at image_size
        if size <= family_named(mode.family).squash_max_side:
            # Official quirk: small sizes are stretched to a square (aspect distorted), not padded.
            view = image.resize((size, size), Image.Resampling.BICUBIC)
            view = _pad(view, size)  # a no-op on a square image of the right size; kept for parity
        else:
            view = _pad(image, size)
        return TiledImage(view, [], (1, 1))
    width, height = image.size
    tiles: list[Image.Image] = []
    grid = (1, 1)
    # Official: images that fit in one tile (hard-coded there: 640 in v1, 768 in OCR 2) get no crops at all.
    if not (width <= mode.image_size and height <= mode.image_size):
        grid = choose_crop_grid(width, height, mode.min_crops, mode.max_crops, mode.image_size)
        if grid[0] > 1 or grid[1] > 1:
            tiles = _cut_tiles(image, grid, mode.image_size)
    return TiledImage(_pad(image, mode.base_size), tiles, grid)


def image_token_count(mode: Mode, crop_grid: tuple[int, int], has_crops: bool) -> int:
    """Number of <image> tokens for one image, from the token layout of the mode's family."""
    return family_named(mode.family).layout.image_tokens(mode, crop_grid, has_crops)


def _normalize_lut() -> np.ndarray:
    # Same float32 arithmetic as torchvision: x / 255, then (x - 0.5) / 0.5.
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    return ((values - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)


NORMALIZE_LUT: np.ndarray = _normalize_lut()


def normalize(view: Image.Image) -> np.ndarray:
    """ToTensor + Normalize(0.5, 0.5): float32 [3, H, W] in [-1, 1]."""
    if view.mode != "RGB":
        view = view.convert("RGB")
    pixels = np.asarray(view, dtype=np.uint8)  # [H, W, 3]
    return np.ascontiguousarray(NORMALIZE_LUT[pixels.transpose(2, 0, 1)])


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even like torch's .to(torch.bfloat16)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    # NaNs must stay NaN (rounding could carry a NaN payload into infinity); keep them quiet.
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded)
    return rounded.astype(np.uint16)


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16, returned as float32."""
    return (bfloat16_bits(x).astype(np.uint32) << np.uint32(16)).view(np.float32)


BF16_LUT: np.ndarray = round_to_bfloat16(NORMALIZE_LUT)


def normalize_bfloat16(view: Image.Image) -> np.ndarray:
    """normalize() followed by round_to_bfloat16(), through a 256-entry table (fast for big views)."""
    if view.mode != "RGB":
        view = view.convert("RGB")
    pixels = np.asarray(view, dtype=np.uint8)
    return np.ascontiguousarray(BF16_LUT[pixels.transpose(2, 0, 1)])


def to_image_input(tiled: TiledImage) -> ImageInput:
    """The backend payload: bf16-rounded float32 CHW arrays."""
    global_view = normalize_bfloat16(tiled.global_view)
    local_views = np.stack([normalize_bfloat16(tile) for tile in tiled.tiles]) if tiled.tiles else None
    return ImageInput(global_view=global_view, local_views=local_views, crop_grid=tiled.crop_grid)


def image_tokens_for(mode: Mode, size: tuple[int, int]) -> int:
    """<image> tokens one page of `size` pixels takes in `mode`, as `common.model.tiling.tile_image` would tile it.

    EXIF rotation may swap width and height after this is read, so both orientations are considered.
    """
    counts = []
    for width, height in (size, size[::-1]):
        grid, crops = (1, 1), False
        if mode.crop_mode and not (width <= mode.image_size and height <= mode.image_size):
            grid = choose_crop_grid(width, height, mode.min_crops, mode.max_crops, mode.image_size)
            crops = grid != (1, 1)
        counts.append(image_token_count(mode, grid, crops))
    return max(counts)


def most_image_tokens(mode: Mode) -> int:
    """The largest count one image can take in `mode` (its worst tile grid)."""
    grids = candidate_grids(mode.min_crops, mode.max_crops) if mode.crop_mode else [(1, 1)]
    return max(image_token_count(mode, grid, grid != (1, 1)) for grid in grids)


def default_max_image_tokens() -> int:
    """What a Gundam page with 9 tiles needs, plus a quarter of headroom, in whole blocks of 256."""
    needed = most_image_tokens(DEEPSEEK_OCR.modes["gundam"]) * 5 // 4
    return -(-needed // 256) * 256
