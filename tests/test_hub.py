"""common.model.hub: local directories (single or sharded), clear errors, offline without cache. No network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.errors import ModelNotFoundError
from common.model.hub import check_model_dir, resolve_model, weight_files
from tests.conftest import MODEL_DIR


def test_local_directory(tmp_path: Path) -> None:
    assert resolve_model(str(MODEL_DIR)) == MODEL_DIR
    assert [p.name for p in weight_files(MODEL_DIR)] == ["model.safetensors"]


def test_sharded_index(tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})
    )
    with pytest.raises(ModelNotFoundError, match="b.safetensors"):
        check_model_dir(tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"")
    assert [p.name for p in weight_files(tmp_path)] == ["a.safetensors", "b.safetensors"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "missing-dir"))
    with pytest.raises(ModelNotFoundError, match="missing config.json, tokenizer.json"):
        resolve_model(str(tmp_path))
    shutil.copy(MODEL_DIR / "config.json", tmp_path)
    shutil.copy(MODEL_DIR / "tokenizer.json", tmp_path)
    with pytest.raises(ModelNotFoundError, match="has no weights"):
        resolve_model(str(tmp_path))


def test_offline_without_cache_is_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("deepseek-ai/DeepSeek-OCR", offline=True, show_progress=False)
    message = str(err.value)
    assert "offline" in message and "--model DIR" in message and "\n" not in message
