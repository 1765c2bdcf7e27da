"""Views, crop grids and normalisation, bit-exact against the official preprocessing fixtures of both families
(every preprocessing entry and model case: views byte-identical, normalised-pixel hashes, crop grids, token counts)."""

from __future__ import annotations

import hashlib
import json
import struct
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common.documents.images import load_image
from common.model.families import DEEPSEEK_OCR, DEEPSEEK_OCR_2, resolve_mode
from common.model.modes import Mode
from common.model.tiling import (
    TiledImage,
    bfloat16_bits,
    choose_crop_grid,
    image_token_count,
    normalize,
    round_to_bfloat16,
    tile_image,
    to_image_input,
)
from tests.conftest import FIXTURES, safetensors_names
from tests.helpers_backend import FAMILIES


def read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
    """Minimal reader that also handles BF16 (returned as raw uint16), which safetensors.numpy cannot load."""
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    dtypes = {"F32": np.float32, "BF16": np.uint16, "I64": np.int64, "BOOL": np.bool_, "F16": np.float16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[8 + header_len + start : 8 + header_len + end]
        out[name] = np.frombuffer(raw, dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@cache
def view_hashes(root: Path) -> dict[str, Any]:
    """views/<name>.png -> its size and the sha256 of its RGB bytes (the views themselves are not committed)."""
    return json.loads((root / "view_hashes.json").read_text())


@cache
def fixture_image(root: Path, rel: str) -> Image.Image:
    return load_image(root / rel)


@cache
def tiled(root: Path, rel: str, mode: Mode) -> TiledImage:
    return tile_image(fixture_image(root, rel), mode)


@cache
def view_digests(root: Path, rel: str, mode: Mode, index: int) -> tuple[tuple[int, int], str, str, str]:
    """(size, sha256 of RGB bytes, of normalised float32, of bf16 bits) of one view; shared views hash once"""
    result = tiled(root, rel, mode)
    view = [result.global_view, *result.tiles][index]
    assert view.mode == "RGB"
    normalized = normalize(view)
    assert normalized.dtype == np.float32 and normalized.shape == (3, view.height, view.width)
    return (
        view.size,
        sha256(view.tobytes()),
        sha256(normalized.tobytes()),
        sha256(bfloat16_bits(normalized).tobytes()),
    )


def _entries() -> list[Any]:
    """(family, entry) for every preprocessing entry and model case of both families."""
    return [
        pytest.param(name, entry, id=f"{name}-{entry['id']}")
        for name, fixtures in FAMILIES.items()
        for entry in fixtures.entries() + list(fixtures.manifest()["cases"])
    ]


def _cases() -> list[Any]:
    return [pytest.param(name, case, id=f"{name}-{case['id']}") for name, fixtures in FAMILIES.items()
            for case in fixtures.manifest()["cases"]]


@pytest.mark.parametrize(("family", "entry"), _entries())
def test_views_bit_exact(family: str, entry: dict[str, Any]) -> None:
    fixtures = FAMILIES[family]
    mode = fixtures.preset(entry)  # the family's preset of that name has the entry's sizes
    result = tiled(fixtures.root, entry["image"], mode)
    assert list(result.crop_grid) == entry["images_spatial_crop"]
    assert len(result.tiles) == entry["n_local_crops"]
    assert [v["role"] for v in entry["views"]] == ["global"] + [
        f"local_{i}" for i in range(len(result.tiles))
    ]
    for index, expected in enumerate(entry["views"]):
        stored = view_hashes(fixtures.root)[expected["png"]]
        size, rgb_sha, f32_sha, bf16_sha = view_digests(fixtures.root, entry["image"], mode, index)
        assert size == (expected["width"], expected["height"]) == (stored["width"], stored["height"])
        assert rgb_sha == stored["rgb_sha256"], f"{entry['id']} {expected['role']} pixels differ"
        assert f32_sha == expected["normalized_f32_sha256"]
        assert bf16_sha == expected["normalized_bf16_sha256"]
    assert image_token_count(mode, result.crop_grid, bool(result.tiles)) == entry["n_image_tokens"]


@pytest.mark.parametrize(("family", "case"), _cases())
def test_image_input_matches_case_pixels(family: str, case: dict[str, Any]) -> None:
    """The backend payload: bf16-rounded float32 views, equal to the pixels the official model received."""
    fixtures = FAMILIES[family]
    mode = fixtures.preset(case)
    image_input = to_image_input(tiled(fixtures.root, case["image"], mode))
    global_sha = case["views"][0]["normalized_bf16_sha256"]
    assert image_input.global_view.dtype == np.float32
    assert sha256(bfloat16_bits(image_input.global_view).tobytes()) == global_sha
    assert np.array_equal(round_to_bfloat16(image_input.global_view), image_input.global_view)
    assert list(image_input.crop_grid) == case["images_spatial_crop"]
    if case["n_local_crops"]:
        assert image_input.local_views is not None
        assert image_input.local_views.shape == (
            case["n_local_crops"],
            3,
            case["image_size"],
            case["image_size"],
        )
        for tile, view in zip(image_input.local_views, case["views"][1:], strict=True):
            assert sha256(bfloat16_bits(tile).tobytes()) == view["normalized_bf16_sha256"]
    else:
        assert image_input.local_views is None and not image_input.has_crops
    tensors = read_safetensors_raw(fixtures.root / case["tensors"])
    if "pixel_values_bf16" in tensors:  # stored for some cases only (DeepSeek-OCR's pm07)
        stored = tensors["pixel_values_bf16"]
        if stored.dtype == np.uint16:
            assert np.array_equal(bfloat16_bits(image_input.global_view), stored[0])
        else:
            assert np.array_equal(image_input.global_view, stored[0])
    if "pixel_values_f32" in tensors:
        assert np.array_equal(
            normalize(tiled(fixtures.root, case["image"], mode).global_view),
            tensors["pixel_values_f32"][0],
        )


def test_some_case_stores_the_pixels_it_was_given() -> None:
    """The pixel_values comparisons above run on at least one case (the fixtures store them for DeepSeek-OCR's
    pm07), so a renamed tensor cannot turn them off silently."""
    stored = [case["id"] for case in FAMILIES["deepseek-ocr"].manifest()["cases"]
              if {"pixel_values_bf16", "pixel_values_f32"} <= safetensors_names(FIXTURES / case["tensors"])]
    assert stored


def test_pixel_lut_all_256_values() -> None:
    lut = read_safetensors_raw(FIXTURES / "pixel_lut.safetensors")
    values = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
    normalized = normalize(Image.fromarray(values, "RGB"))
    for channel in range(3):
        assert np.array_equal(normalized[channel, 0], lut["u8_to_f32"])
        assert np.array_equal(bfloat16_bits(normalized[channel, 0]), lut["u8_to_bf16"])
        assert np.array_equal(round_to_bfloat16(normalized[channel, 0]), lut["u8_to_bf16_as_f32"])


def test_bfloat16_round_to_nearest_even() -> None:
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    x = np.array(
        [
            1.0,
            1 + ulp / 2,
            1 + 3 * ulp / 2,
            1 + ulp / 2 + 2**-20,
            -(1 + ulp / 2),
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.finfo(np.float32).max,
        ],
        dtype=np.float32,
    )
    expected = np.array(
        [1.0, 1.0, 1 + 2 * ulp, 1 + ulp, -1.0, 0.0, -0.0, np.inf, -np.inf, np.inf], dtype=np.float32
    )
    assert np.array_equal(round_to_bfloat16(x), expected)
    assert np.signbit(round_to_bfloat16(x)[6])
    assert np.isnan(round_to_bfloat16(np.array([np.nan], dtype=np.float32))).all()
    assert bfloat16_bits(np.array([1.0, -2.0], dtype=np.float32)).tolist() == [0x3F80, 0xC000]


def test_crop_grid_choice_and_tie_rule() -> None:
    # Closest aspect ratio wins.
    assert choose_crop_grid(850, 1100, 2, 9, 640) == (2, 3)
    assert choose_crop_grid(1500, 500, 2, 9, 640) == (3, 1)
    assert choose_crop_grid(400, 1200, 2, 9, 640) == (1, 3)
    # Exact tie between (2, 1) and (4, 2): the later grid only if the image has more than half its pixels.
    assert choose_crop_grid(1280, 640, 2, 9, 640) == (2, 1)
    assert choose_crop_grid(2560, 1280, 2, 9, 640) == (4, 2)
    # Square images: 1x1 is not a candidate (min 2), so (2, 2); (3, 3) once the image is large enough.
    assert choose_crop_grid(700, 700, 2, 9, 640) == (2, 2)
    assert choose_crop_grid(2000, 2000, 2, 9, 640) == (3, 3)
    # max_crops limits the grid (the authors' vLLM setting is 6).
    assert choose_crop_grid(2000, 2000, 2, 6, 640) == (2, 2)


@pytest.mark.parametrize(("family", "wide"), [("deepseek-ocr", (641, 200)), ("deepseek-ocr-2", (769, 300))])
def test_image_within_one_tile_has_no_tiles(family: str, wide: tuple[int, int]) -> None:
    """An image that fits in one tile (640 px in v1, 768 px in OCR 2) gets none; one pixel more and it is tiled."""
    mode = FAMILIES[family].family.default
    tile = mode.image_size
    assert mode.crop_mode and wide[0] == tile + 1
    result = tile_image(Image.new("RGB", (tile, tile), (1, 2, 3)), mode)
    assert result.tiles == [] and result.crop_grid == (1, 1)
    assert result.global_view.size == (mode.base_size, mode.base_size)
    tiled_wide = tile_image(Image.new("RGB", wide), mode)
    assert tiled_wide.crop_grid == (3, 1) and [t.size for t in tiled_wide.tiles] == [(tile, tile)] * 3


def test_v2_tie_rule_and_max_crops() -> None:
    """1000x800 is as close to (2,2) as to (3,2) and too small for the later one: (2,2). Six tiles at most by
    default: a long strip gets (6, 1), not more."""
    mode = resolve_mode(family=DEEPSEEK_OCR_2)
    assert tile_image(Image.new("RGB", (1000, 800)), mode).crop_grid == (2, 2)
    assert tile_image(Image.new("RGB", (9000, 700)), mode).crop_grid == (6, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_crop_small_squashes_and_base_pads(family: str) -> None:
    """The no-crop paths: a small view (640 px in v1, 768 px in OCR 2) stretches the image to a square, a 1024 px
    one pads it (grey bars)."""
    preset = FAMILIES[family].family
    image = Image.new("RGB", (1000, 500), (255, 255, 255))
    small_mode, base_mode = resolve_mode("small", family=preset), resolve_mode("base", family=preset)
    small = tile_image(image, small_mode).global_view
    base = tile_image(image, base_mode).global_view
    assert small.size == (small_mode.image_size,) * 2 and small.getpixel((0, 0)) == (255, 255, 255)
    assert base.size == (base_mode.image_size,) * 2 and base.getpixel((0, 0)) == (127, 127, 127)


def test_tiles_are_row_major_cuts_of_the_resized_image() -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (900, 1400, 3), dtype=np.uint8))
    mode = resolve_mode("gundam")
    result = tile_image(image, mode)
    columns, rows = result.crop_grid
    resized = np.asarray(image.resize((640 * columns, 640 * rows), Image.Resampling.BICUBIC))
    for index, tile in enumerate(result.tiles):
        r, c = divmod(index, columns)
        assert np.array_equal(np.asarray(tile), resized[r * 640 : (r + 1) * 640, c * 640 : (c + 1) * 640])


def test_image_token_count_formula() -> None:
    assert image_token_count(DEEPSEEK_OCR.modes["tiny"], (1, 1), False) == 8 * 9 + 1
    assert image_token_count(DEEPSEEK_OCR.modes["large"], (1, 1), False) == 20 * 21 + 1
    assert image_token_count(DEEPSEEK_OCR.modes["gundam"], (1, 1), False) == 16 * 17 + 1
    assert image_token_count(DEEPSEEK_OCR.modes["gundam"], (2, 3), True) == 16 * 17 + 1 + (10 * 3) * (10 * 2 + 1)
