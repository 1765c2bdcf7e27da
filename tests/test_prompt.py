"""Prompt building: input_ids, images_seq_mask and crop grid equal the official ones; presets; chat."""

from __future__ import annotations

from functools import cache
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
from tests.conftest import FIXTURES, MODEL_DIR, cases_manifest, model_cases

PROMPT_KEYS = ("input_ids", "images_seq_mask", "images_spatial_crop")


@cache
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR)


@cache
def fixture_image(rel: str) -> Image.Image:
    return load_image(FIXTURES / rel)


@cache
def preprocess_tensors() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURES / "preprocess.safetensors"))


def case_prompt_tensors(case: dict[str, Any]) -> dict[str, np.ndarray]:
    # Only the prompt tensors: some case files also hold bf16 pixels, which safetensors' numpy loader rejects.
    with safe_open(str(FIXTURES / case["tensors"]), framework="np") as handle:
        return {key: handle.get_tensor(key) for key in PROMPT_KEYS if key in handle.keys()}  # noqa: SIM118


def _check(prepared: Any, ids: np.ndarray, mask: np.ndarray, crop: np.ndarray | None, entry: dict) -> None:
    assert prepared.input_ids.dtype == np.int64 and prepared.images_seq_mask.dtype == np.bool_
    assert np.array_equal(prepared.input_ids, ids)
    assert np.array_equal(prepared.images_seq_mask, mask)
    assert prepared.prompt_tokens == entry["input_len"]
    if crop is not None:
        assert len(prepared.images) == 1
        assert [list(prepared.images[0].crop_grid)] == crop.tolist()
        assert prepared.image_tokens == entry["n_image_tokens"]
    # every masked position holds the image token, and nothing else does
    assert np.array_equal(prepared.input_ids == tokenizer().image_token_id, prepared.images_seq_mask)
    assert prepared.input_ids[0] == tokenizer().bos_id and tokenizer().eos_id not in prepared.input_ids


@pytest.mark.parametrize("entry", cases_manifest()["preprocess"]["entries"], ids=lambda e: e["id"])
def test_preprocess_entry(entry: dict[str, Any]) -> None:
    tensors = preprocess_tensors()
    key = entry["id"]
    prepared = prepare_inputs(
        tokenizer(), entry["prompt"], [fixture_image(entry["image"])], resolve_mode(entry["mode"])
    )
    _check(
        prepared,
        tensors[f"{key}.input_ids"],
        tensors[f"{key}.images_seq_mask"],
        tensors[f"{key}.images_spatial_crop"],
        entry,
    )


@pytest.mark.parametrize("case", model_cases(), ids=lambda c: c["id"])
def test_model_case(case: dict[str, Any]) -> None:
    tensors = case_prompt_tensors(case)
    if "image" in case:
        prompt, images, mode = case["prompt"], [fixture_image(case["image"])], resolve_mode(case["mode"])
    else:  # text only: [BOS] + encode(text)
        prompt, images, mode = case["text"], [], DEEPSEEK_OCR.modes["base"]
    prepared = prepare_inputs(tokenizer(), prompt, images, mode)
    # The text-only case stores no mask (no image position): all False.
    mask = tensors.get("images_seq_mask", np.zeros(tensors["input_ids"].shape, dtype=np.bool_))
    _check(prepared, tensors["input_ids"], mask, tensors.get("images_spatial_crop"), case)
    if not images:
        assert prepared.input_ids.tolist() == [tokenizer().bos_id, *tokenizer().encode(case["text"])]
        assert prepared.images == []


def test_prompt_without_placeholder_gets_one_per_image() -> None:
    tok = tokenizer()
    image = fixture_image("images/small.png")
    mode = DEEPSEEK_OCR.modes["tiny"]
    implicit = prepare_inputs(tok, "  Free OCR. ", [image, image], mode)
    explicit = prepare_inputs(tok, "<image>\n<image>\nFree OCR.", [image, image], mode)
    assert np.array_equal(implicit.input_ids, explicit.input_ids)
    assert len(implicit.images) == 2 and implicit.image_tokens == 2 * (8 * 9 + 1)


def test_placeholder_count_must_match_images() -> None:
    tok = tokenizer()
    image = fixture_image("images/small.png")
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
