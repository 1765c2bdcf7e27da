"""Loading DeepSeek-OCR 2 checkpoints on torch: the real model's exact names and shapes, strict errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import CheckpointError
from common.model.config import load_config
from tests.conftest import FIXTURES_V2, MODEL_DIR, MODEL_DIR_V2

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def test_meta_model_from_real_config_has_exactly_the_real_checkpoint_tensors() -> None:
    from dsocr_torch.loader import build_meta_model, expected_tensors

    model = build_meta_model(load_config(FIXTURES_V2 / "real_config.json"))
    ours = {name: list(shape) for name, shape in expected_tensors(model).items()}
    listing = json.loads((FIXTURES_V2 / "real_checkpoint_shapes.json").read_text())
    real = listing["tensors"]
    assert len(real) == listing["n_tensors"] == 2707
    assert sorted(set(real) - set(ours)) == []
    assert sorted(set(ours) - set(real)) == []
    assert {n: s for n, s in ours.items() if real[n] != s} == {}
    assert sum(torch.Size(s).numel() for s in ours.values()) == listing["n_values"]
    assert all(p.is_meta for p in model.parameters())


def _folder(tmp_path: Path, config_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", tmp_path / "config.json")
    for name in SIDE_FILES:
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_query_table_is_named(tmp_path: Path) -> None:
    from dsocr_torch.loader import load_model

    tensors = load_file(str(MODEL_DIR_V2 / "model.safetensors"))
    del tensors["model.qwen2_model.query_768.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): model\.qwen2_model\.query_768\.weight"):
        load_model(_folder(tmp_path, MODEL_DIR_V2, tensors), device="cpu", dtype="float32")


def test_v1_weights_under_a_v2_config_are_refused_by_name(tmp_path: Path) -> None:
    from dsocr_torch.loader import load_model

    folder = _folder(tmp_path, MODEL_DIR_V2, load_file(str(MODEL_DIR / "model.safetensors")))
    names = r"missing tensor.*unexpected tensor\(s\): model\.image_newline, model\.vision_model"
    with pytest.raises(CheckpointError, match=names):
        load_model(folder, device="cpu", dtype="float32")


def test_bfloat16_load_keeps_checkpoint_values() -> None:
    from dsocr_torch.loader import load_model

    model = load_model(MODEL_DIR_V2, device="cpu", dtype="bfloat16")
    state = model.state_dict()
    tensors = load_file(str(MODEL_DIR_V2 / "model.safetensors"))
    assert set(state) == set(tensors)
    for name, value in tensors.items():
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], value), name
