"""Loading checkpoints of both families on torch: real-model readiness on the meta device, sharded checkpoints,
clear errors, dtypes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import BackendUnavailableError, CheckpointError, ModelNotFoundError
from common.model.config import load_config
from tests.conftest import MODEL_DIR, MODEL_DIR_V2, rel_err
from tests.helpers_backend import FAMILIES, backend_of, prefill, real_checkpoint

CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SIDE_FILES = CONFIG_FILES[1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_model_from_real_config_has_exactly_the_real_checkpoint_tensors(family: str) -> None:
    from dsocr_torch.weights.loader import build_meta_model, expected_tensors

    config, real, n_tensors, n_values = real_checkpoint(family)
    model = build_meta_model(load_config(config))
    ours = {name: list(shape) for name, shape in expected_tensors(model).items()}
    assert len(real) == n_tensors
    assert sorted(set(real) - set(ours)) == []
    assert sorted(set(ours) - set(real)) == []
    assert {n: s for n, s in ours.items() if real[n] != s} == {}
    assert sum(torch.Size(s).numel() for s in ours.values()) == n_values
    assert all(p.is_meta for p in model.parameters())


def test_materialized_experts_are_views_of_the_stacks() -> None:
    """bind_stacked_experts keeps one copy: expert weights are views into the [E, ...] stacks."""
    from dsocr_torch.moe import MoEFeedForward
    from dsocr_torch.weights.loader import build_meta_model, materialize

    model = build_meta_model(load_config(MODEL_DIR))
    materialize(model, torch.device("cpu"), torch.float32)
    moe = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    assert moe.gate_up_stacked is not None and moe.down_stacked is not None
    inter = moe.intermediate
    moe.experts[1].up_proj.weight.data.fill_(3.0)
    assert bool((moe.gate_up_stacked[1, inter:] == 3.0).all())
    assert moe.experts[1].down_proj.weight.data_ptr() == moe.down_stacked[1].data_ptr()


@pytest.fixture(scope="module")
def reference_logits() -> torch.Tensor:
    return _last_logits(MODEL_DIR)


def _last_logits(model_dir: Path, device: str = "cpu") -> torch.Tensor:
    from dsocr_torch.weights.loader import load_model

    model = load_model(model_dir, device=device, dtype="float32")
    return prefill(backend_of(model), FAMILIES["deepseek-ocr"].from_embeds("pm07_gray_tiny")).cpu()


def _copy_configs(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        shutil.copy(MODEL_DIR / name, target / name)


def test_sharded_checkpoint_gives_identical_logits(tmp_path: Path, reference_logits: torch.Tensor) -> None:
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    names = sorted(tensors)
    shards = [names[0::3], names[1::3], names[2::3]]
    _copy_configs(tmp_path)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(shard, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(_last_logits(tmp_path), reference_logits)


def _write_variant(tmp_path: Path, edit: Any) -> Path:
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    edit(tensors)
    _copy_configs(tmp_path)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    from dsocr_torch.weights.loader import load_model

    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    folder = _write_variant(tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): " + name.replace(".", r"\.")):
        load_model(folder, device="cpu", dtype="float32")


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    from dsocr_torch.weights.loader import load_model

    folder = _write_variant(tmp_path, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model\.extra\.weight"):
        load_model(folder, device="cpu", dtype="float32")


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path: Path) -> None:
    from dsocr_torch.weights.loader import load_model

    name = "model.norm.weight"
    folder = _write_variant(tmp_path, lambda t: t.update({name: torch.ones(7, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight \(checkpoint \[7\], model \[40\]\)"):
        load_model(folder, device="cpu", dtype="float32")


def test_folder_without_weights_is_model_not_found(tmp_path: Path) -> None:
    from dsocr_torch.weights.loader import load_model

    _copy_configs(tmp_path)
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        load_model(tmp_path, device="cpu", dtype="float32")


def test_truncated_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    from dsocr_torch.weights.loader import load_model

    _copy_configs(tmp_path)
    data = (MODEL_DIR / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path, device="cpu", dtype="float32")


def test_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsocr_torch.weights import loader

    cpu = torch.device("cpu")
    assert loader.resolve_dtype("float16", cpu) is torch.float16
    assert loader.resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    assert loader.resolve_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    assert loader.resolve_dtype("auto", cpu) is torch.float32
    with pytest.raises(BackendUnavailableError, match="int8"):
        loader.resolve_dtype("int8", cpu)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_load_keeps_checkpoint_values_and_int64_position_ids(family: str) -> None:
    from dsocr_torch.weights.loader import load_model

    model_dir = FAMILIES[family].model_dir
    model = load_model(model_dir, device="cpu", dtype="bfloat16")
    tensors = load_file(str(model_dir / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, value in tensors.items():
        assert state[name].dtype == (torch.bfloat16 if value.is_floating_point() else value.dtype), name
        assert torch.equal(state[name], value), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda_is_backend_unavailable() -> None:
    from dsocr_torch.weights.loader import load_model

    with pytest.raises(BackendUnavailableError, match="cuda"):
        load_model(MODEL_DIR, device="cuda", dtype="auto")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_load_matches_cpu(reference_logits: torch.Tensor) -> None:
    logits = _last_logits(MODEL_DIR, device="cuda")
    assert rel_err(logits.numpy(), reference_logits.numpy()) <= FAMILIES["deepseek-ocr"].tolerance


# ---- DeepSeek-OCR 2 ---------------------------------------------------------------------------------------


def _folder(tmp_path: Path, config_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", tmp_path / "config.json")
    for name in SIDE_FILES:
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_v2_missing_query_table_is_named(tmp_path: Path) -> None:
    from dsocr_torch.weights.loader import load_model

    tensors = load_file(str(MODEL_DIR_V2 / "model.safetensors"))
    del tensors["model.qwen2_model.query_768.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): model\.qwen2_model\.query_768\.weight"):
        load_model(_folder(tmp_path, MODEL_DIR_V2, tensors), device="cpu", dtype="float32")


def test_v1_weights_under_a_v2_config_are_refused_by_name(tmp_path: Path) -> None:
    from dsocr_torch.weights.loader import load_model

    folder = _folder(tmp_path, MODEL_DIR_V2, load_file(str(MODEL_DIR / "model.safetensors")))
    names = r"missing tensor.*unexpected tensor\(s\): model\.image_newline, model\.vision_model"
    with pytest.raises(CheckpointError, match=names):
        load_model(folder, device="cpu", dtype="float32")
