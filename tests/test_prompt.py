"""Prompt building: input_ids, images_seq_mask and crop grid equal the official ones (both families, every
preprocessing entry and model case); presets; chat."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

from common.documents.images import load_image
from common.errors import InputError
from common.model.families import DEEPSEEK_OCR, resolve_mode
from common.model.prompt import (
    TASKS,
    extract_fields,
    prepare_inputs,
    task_prompt,
)
from common.model.tokenizer import Tokenizer
from tests.conftest import FIXTURES, MODEL_DIR, cases_manifest, fixture_tokenizer
from tests.helpers_backend import FAMILIES

PROMPT_KEYS = ("input_ids", "images_seq_mask", "images_spatial_crop")


def tokenizer(model_dir: Path = MODEL_DIR) -> Tokenizer:
    return fixture_tokenizer(model_dir)


@cache
def fixture_image(root: Path, rel: str) -> Image.Image:
    return load_image(root / rel)


@cache
def preprocess_tensors(root: Path) -> dict[str, np.ndarray]:
    return load_file(str(root / "preprocess.safetensors"))


def case_prompt_tensors(root: Path, case: dict[str, Any]) -> dict[str, np.ndarray]:
    # Only the prompt tensors: some case files also hold bf16 pixels, which safetensors' numpy loader rejects.
    with safe_open(str(root / case["tensors"]), framework="np") as handle:
        return {key: handle.get_tensor(key) for key in PROMPT_KEYS if key in handle.keys()}  # noqa: SIM118


def _check(prepared: Any, ids: np.ndarray, mask: np.ndarray, crop: np.ndarray | None, entry: dict,
           tok: Tokenizer) -> None:
    assert prepared.input_ids.dtype == np.int64 and prepared.images_seq_mask.dtype == np.bool_
    assert np.array_equal(prepared.input_ids, ids)
    assert np.array_equal(prepared.images_seq_mask, mask)
    assert prepared.prompt_tokens == entry["input_len"]
    if crop is not None:
        assert len(prepared.images) == 1
        assert [list(prepared.images[0].crop_grid)] == crop.tolist()
        assert prepared.image_tokens == entry["n_image_tokens"]
    # every masked position holds the image token, and nothing else does
    assert np.array_equal(prepared.input_ids == tok.image_token_id, prepared.images_seq_mask)
    assert prepared.input_ids[0] == tok.bos_id and tok.eos_id not in prepared.input_ids


def _family_params(kind: str) -> list[Any]:
    """(family, entry) of every preprocessing entry ("entries") or model case, text-only included ("cases")."""
    return [
        pytest.param(name, item, id=f"{name}-{item['id']}")
        for name, fixtures in FAMILIES.items()
        for item in (fixtures.entries() if kind == "entries" else fixtures.cases())
    ]


@pytest.mark.parametrize(("family", "entry"), _family_params("entries"))
def test_preprocess_entry(family: str, entry: dict[str, Any]) -> None:
    fixtures = FAMILIES[family]
    tensors, key, tok = preprocess_tensors(fixtures.root), entry["id"], tokenizer(fixtures.model_dir)
    image = fixture_image(fixtures.root, entry["image"])
    prepared = prepare_inputs(tok, entry["prompt"], [image], fixtures.preset(entry))
    _check(
        prepared,
        tensors[f"{key}.input_ids"],
        tensors[f"{key}.images_seq_mask"],
        tensors[f"{key}.images_spatial_crop"],
        entry,
        tok,
    )


@pytest.mark.parametrize(("family", "case"), _family_params("cases"))
def test_model_case(family: str, case: dict[str, Any]) -> None:
    fixtures = FAMILIES[family]
    tensors, tok = case_prompt_tensors(fixtures.root, case), tokenizer(fixtures.model_dir)
    if "image" in case:
        prompt, images = case["prompt"], [fixture_image(fixtures.root, case["image"])]
        mode = fixtures.preset(case)
    else:  # text only: [BOS] + encode(text)
        assert case["kind"] == "lm_only"
        prompt, images, mode = case["text"], [], resolve_mode(family=fixtures.family)
    prepared = prepare_inputs(tok, prompt, images, mode)
    # The text-only case stores no mask (no image position): all False.
    mask = tensors.get("images_seq_mask", np.zeros(tensors["input_ids"].shape, dtype=np.bool_))
    crop = tensors.get("images_spatial_crop")
    assert (crop is None) == (not images)  # every image case stores its crop grid
    _check(prepared, tensors["input_ids"], mask, crop, case, tok)
    if not images:
        assert prepared.input_ids.tolist() == [tok.bos_id, *tok.encode(case["text"])]
        assert prepared.images == [] and not prepared.images_seq_mask.any()


def test_prompt_without_placeholder_gets_one_per_image() -> None:
    tok = tokenizer()
    image = fixture_image(FIXTURES, "images/small.png")
    mode = DEEPSEEK_OCR.modes["tiny"]
    implicit = prepare_inputs(tok, "  Free OCR. ", [image, image], mode)
    explicit = prepare_inputs(tok, "<image>\n<image>\nFree OCR.", [image, image], mode)
    assert np.array_equal(implicit.input_ids, explicit.input_ids)
    assert len(implicit.images) == 2 and implicit.image_tokens == 2 * (8 * 9 + 1)


def test_placeholder_count_must_match_images() -> None:
    tok = tokenizer()
    image = fixture_image(FIXTURES, "images/small.png")
    with pytest.raises(InputError, match="2 <image>"):
        prepare_inputs(tok, "<image><image>Free OCR.", [image], DEEPSEEK_OCR.modes["tiny"])
    with pytest.raises(InputError, match="1 <image>"):
        prepare_inputs(tok, "<image>\nFree OCR.", [], DEEPSEEK_OCR.modes["tiny"])


def test_extract_fields_name_what_the_schema_asks_for() -> None:
    schema = {
        "type": "object",
        "properties": {
            "vendor": {"type": "string"},
            "address": {"type": "object", "properties": {"city": {}, "zip": {}}},
            "lines": {"type": "array", "items": {"type": "object", "properties": {"item": {}, "qty": {}}}},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    fields = extract_fields(schema)
    assert fields == ["vendor", "address (city, zip)", "lines (item, qty)", "tags"]
    assert task_prompt("extract", fields=fields) == (
        "<image>\nExtract vendor, address (city, zip), lines (item, qty) and tags from the document as JSON."
    )
    assert extract_fields({"type": "object"}) == extract_fields(None) == []
    assert extract_fields({"type": "array", "items": {"type": "integer"}}) == []


def test_task_presets() -> None:
    assert TASKS == {
        "markdown": "<image>\n<|grounding|>Convert the document to markdown.",
        "ocr": "<image>\nFree OCR.",
        "figure": "<image>\nParse the figure.",
        "describe": "<image>\nDescribe this image in detail.",
        "locate": "<image>\nLocate <|ref|>TEXT<|/ref|> in the image.",
        "grounding": "<image>\n<|grounding|>OCR this image.",
        "extract": "<image>\nExtract FIELDS from the document as JSON.",
    }
    assert task_prompt("ocr") == "<image>\nFree OCR."
    assert task_prompt("locate", ref="the total") == "<image>\nLocate <|ref|>the total<|/ref|> in the image."
    with pytest.raises(InputError):
        task_prompt("locate")
    with pytest.raises(InputError, match="markdown"):
        task_prompt("translate")
    assert task_prompt("extract", fields=["vendor"]) == "<image>\nExtract vendor from the document as JSON."
    assert task_prompt("extract", fields=[]) == "<image>\nExtract the content from the document as JSON."
    with pytest.raises(InputError, match="JSON schema"):
        task_prompt("extract")
    # The markdown preset is the fixtures' prompt (they add a trailing space that strip() removes).
    entry = cases_manifest()["preprocess"]["entries"][0]
    assert entry["prompt"].strip() == task_prompt("markdown")
