"""DeepSeek-OCR 2 preprocessing against the official infer(): views byte-identical, normalised-pixel hashes,
crop grids, and input_ids / images_seq_mask / images_spatial_crop exactly, for every preprocessing entry
(11 images x 3 settings, plus text before the image) and every model case."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from common.documents.images import load_image
from common.model.families import DEEPSEEK_OCR_2, resolve_mode
from common.model.modes import Mode
from common.model.prompt import prepare_inputs
from common.model.tiling import TiledImage, bfloat16_bits, image_token_count, normalize, tile_image, to_image_input
from common.model.tokenizer import Tokenizer
from tests.conftest import FIXTURES_V2, MODEL_DIR_V2, V2_MODE_NAMES, case_tensors_v2, cases_manifest_v2


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@cache
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR_V2)


@cache
def view_hashes() -> dict[str, Any]:
    return json.loads((FIXTURES_V2 / "view_hashes.json").read_text())


@cache
def preprocess_tensors() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURES_V2 / "preprocess.safetensors"))


@cache
def fixture_image(rel: str) -> Image.Image:
    return load_image(FIXTURES_V2 / rel)


@cache
def tiled(rel: str, mode: Mode) -> TiledImage:
    return tile_image(fixture_image(rel), mode)


def mode_of(entry: dict[str, Any]) -> Mode:
    mode = resolve_mode(V2_MODE_NAMES[entry["mode"]], family=DEEPSEEK_OCR_2)
    assert (mode.base_size, mode.image_size, mode.crop_mode) == (
        entry["base_size"],
        entry["image_size"],
        entry["crop_mode"],
    )
    return mode


def _entries() -> list[dict[str, Any]]:
    manifest = cases_manifest_v2()
    return list(manifest["preprocess"]["entries"]) + list(manifest["cases"])


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e["id"])
def test_views_bit_exact(entry: dict[str, Any]) -> None:
    mode = mode_of(entry)
    result = tiled(entry["image"], mode)
    assert list(result.crop_grid) == entry["images_spatial_crop"]
    assert len(result.tiles) == entry["n_local_crops"]
    assert [v["role"] for v in entry["views"]] == ["global"] + [f"local_{i}" for i in range(len(result.tiles))]
    for view, expected in zip([result.global_view, *result.tiles], entry["views"], strict=True):
        stored = view_hashes()[expected["png"]]
        assert view.mode == "RGB"
        assert view.size == (expected["width"], expected["height"]) == (stored["width"], stored["height"])
        assert sha256(view.tobytes()) == stored["rgb_sha256"], f"{entry['id']} {expected['role']} pixels differ"
        normalized = normalize(view)
        assert sha256(normalized.tobytes()) == expected["normalized_f32_sha256"]
        assert sha256(bfloat16_bits(normalized).tobytes()) == expected["normalized_bf16_sha256"]
    assert image_token_count(mode, result.crop_grid, bool(result.tiles)) == entry["n_image_tokens"]


@pytest.mark.parametrize("entry", cases_manifest_v2()["preprocess"]["entries"], ids=lambda e: e["id"])
def test_prompt_tensors_exact(entry: dict[str, Any]) -> None:
    tensors = preprocess_tensors()
    prepared = prepare_inputs(tokenizer(), entry["prompt"], [fixture_image(entry["image"])], mode_of(entry))
    key = entry["id"]
    assert np.array_equal(prepared.input_ids, tensors[f"{key}.input_ids"])
    assert np.array_equal(prepared.images_seq_mask, tensors[f"{key}.images_seq_mask"])
    assert [list(prepared.images[0].crop_grid)] == tensors[f"{key}.images_spatial_crop"].tolist()
    assert (prepared.prompt_tokens, prepared.image_tokens) == (entry["input_len"], entry["n_image_tokens"])
    assert np.array_equal(prepared.input_ids == tokenizer().image_token_id, prepared.images_seq_mask)


@pytest.mark.parametrize("case", cases_manifest_v2()["cases"], ids=lambda c: c["id"])
def test_case_inputs_and_pixels(case: dict[str, Any]) -> None:
    """The model cases: prompt tensors, and the bf16-rounded pixels handed to the backends."""
    t = case_tensors_v2(case["id"])
    mode = mode_of(case)
    prepared = prepare_inputs(tokenizer(), case["prompt"], [fixture_image(case["image"])], mode)
    assert np.array_equal(prepared.input_ids, t["input_ids"])
    assert np.array_equal(prepared.images_seq_mask, t["images_seq_mask"])
    assert [list(prepared.images[0].crop_grid)] == t["images_spatial_crop"].tolist()
    image = to_image_input(tiled(case["image"], mode))
    assert sha256(bfloat16_bits(image.global_view).tobytes()) == case["views"][0]["normalized_bf16_sha256"]
    tiles = [] if image.local_views is None else list(image.local_views)
    assert len(tiles) == case["n_local_crops"]
    for tile, view in zip(tiles, case["views"][1:], strict=True):
        assert tile.shape == (3, 768, 768)
        assert sha256(bfloat16_bits(tile).tobytes()) == view["normalized_bf16_sha256"]


def test_text_only_case_ids() -> None:
    case = cases_manifest_v2()["lm_only"][0]
    prepared = prepare_inputs(tokenizer(), case["text"], [], resolve_mode(family=DEEPSEEK_OCR_2))
    assert np.array_equal(prepared.input_ids, case_tensors_v2(case["id"])["input_ids"])
    assert not prepared.images_seq_mask.any()


def test_tie_rule_and_crop_threshold() -> None:
    """1000x800 is as close to (2,2) as to (3,2) and too small for the later one: (2,2). An image that fits in one
    768 px tile gets none; one pixel more and it is tiled."""
    mode = resolve_mode(family=DEEPSEEK_OCR_2)
    assert tile_image(Image.new("RGB", (1000, 800)), mode).crop_grid == (2, 2)
    assert tile_image(Image.new("RGB", (768, 768)), mode).tiles == []
    wide = tile_image(Image.new("RGB", (769, 300)), mode)
    assert wide.crop_grid == (3, 1) and [t.size for t in wide.tiles] == [(768, 768)] * 3
    # Six tiles at most by default: a long strip gets (6, 1), not more.
    assert tile_image(Image.new("RGB", (9000, 700)), mode).crop_grid == (6, 1)


def test_no_crop_768_squashes_and_1024_pads() -> None:
    """OCR 2's no-crop paths: 768 px stretches the image to a square, 1024 px pads it (grey bars)."""
    image = Image.new("RGB", (1000, 500), (255, 255, 255))
    small = tile_image(image, resolve_mode("small", family=DEEPSEEK_OCR_2)).global_view
    base = tile_image(image, resolve_mode("base", family=DEEPSEEK_OCR_2)).global_view
    assert small.size == (768, 768) and small.getpixel((0, 0)) == (255, 255, 255)
    assert base.size == (1024, 1024) and base.getpixel((0, 0)) == (127, 127, 127)
