"""MLX model parity with the reference fixtures (MLX CPU, float32) and checkpoint loading.

Per case, the decoder and the image-token assembly run on the reference vision outputs (SAM/CLIP have
their own tests), so all 12 cases stay fast; two small cases also run end to end through SAM and CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from common.documents.images import load_image  # noqa: E402
from common.errors import CheckpointError  # noqa: E402
from common.model.config import load_config, parse_config  # noqa: E402
from common.model.families import resolve_mode
from common.model.tiling import tile_image, to_image_input  # noqa: E402
from dsocr_mlx.convert import save_weights  # noqa: E402
from dsocr_mlx.loader import check_weights, load_model, read_weights  # noqa: E402
from dsocr_mlx.model import DeepseekOCRForCausalLM, scatter_image_embeds  # noqa: E402
from tests.conftest import FIXTURES, MODEL_DIR, case_tensors, model_case_ids, model_cases, rel_err  # noqa: E402

TOLERANCE = 1e-4  # max|diff| <= 1e-4 x max|ref| per tensor
END_TO_END_CASES = ("pm07_gray_tiny", "pm08_rgba_small")


@pytest.fixture(scope="module")
def model() -> DeepseekOCRForCausalLM:
    mx.set_default_device(mx.cpu)
    loaded, quantization = load_model(MODEL_DIR, "float32")
    assert quantization is None
    return loaded


def case_by_id(case_id: str) -> dict[str, Any]:
    return next(c for c in model_cases() if c["id"] == case_id)


def image_input(case: dict[str, Any]) -> Any:
    mode = resolve_mode(
        case["mode"], base_size=case["base_size"], image_size=case["image_size"], crop_mode=case["crop_mode"]
    )
    return to_image_input(tile_image(load_image(FIXTURES / case["image"]), mode))


def nhwc(sam_out_nchw: np.ndarray) -> Any:
    return mx.array(np.ascontiguousarray(sam_out_nchw.transpose(0, 2, 3, 1)))


@pytest.mark.parametrize("case_id", model_case_ids())
def test_stage_parity(model: DeepseekOCRForCausalLM, case_id: str) -> None:
    """projector outputs, image_embeds, inputs_embeds, every layer, final norm, last logits."""
    t = case_tensors(case_id)
    errors: dict[str, float] = {}
    embeds = model.model.embed_tokens(mx.array(t["input_ids"].astype(np.int32)))
    if "image_embeds" in t:
        projected = {}
        for view in ("global", "local"):
            if f"vision.{view}.sam_out" not in t:
                continue
            out = model.project(nhwc(t[f"vision.{view}.sam_out"]), mx.array(t[f"vision.{view}.clip_out"]))
            errors[f"{view}.projector_out"] = rel_err(np.array(out), t[f"vision.{view}.projector_out"])
            projected[view] = out
        grid = tuple(int(v) for v in t["images_spatial_crop"][0])
        image_embeds = model.layout_image_tokens(projected["global"][0], projected.get("local"), grid)
        errors["image_embeds"] = rel_err(np.array(image_embeds), t["image_embeds"])
        embeds = scatter_image_embeds(embeds, t["images_seq_mask"], image_embeds)
    errors["inputs_embeds"] = rel_err(np.array(embeds), t["inputs_embeds"])

    layer_outputs: list[Any] = []
    hidden = model.hidden_states(embeds[None], layer_outputs)
    logits = model.logits(hidden[:, -1])
    for i, out in enumerate(layer_outputs):
        errors[f"layer{i}"] = rel_err(np.array(out[0]), t["layer_outputs"][i])
    errors["final_norm"] = rel_err(np.array(hidden[0]), t["final_norm"])
    errors["last_logits"] = rel_err(np.array(logits[0]), t["last_logits"])
    assert len(layer_outputs) == t["layer_outputs"].shape[0]
    worst = max(errors, key=errors.__getitem__)
    print(f"{case_id}: worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= TOLERANCE, errors


@pytest.mark.parametrize("case_id", END_TO_END_CASES)
def test_end_to_end_through_vision(model: DeepseekOCRForCausalLM, case_id: str) -> None:
    """Real preprocessing -> SAM -> CLIP -> projector -> layout -> decoder, against the fixtures."""
    case = case_by_id(case_id)
    t = case_tensors(case_id)
    record: dict[str, Any] = {}
    image = image_input(case)
    assert list(image.crop_grid) == case["images_spatial_crop"]
    embeds = model.embed_inputs(t["input_ids"], t["images_seq_mask"], [image], record)
    logits = model(embeds)
    view = record["images"][0]["global"]
    errors = {
        "sam_out": rel_err(np.array(view["sam_out"]).transpose(0, 3, 1, 2), t["vision.global.sam_out"]),
        "clip_out": rel_err(np.array(view["clip_out"]), t["vision.global.clip_out"]),
        "projector_out": rel_err(np.array(view["projector_out"]), t["vision.global.projector_out"]),
        "image_embeds": rel_err(np.array(record["image_embeds"]), t["image_embeds"]),
        "inputs_embeds": rel_err(np.array(embeds[0]), t["inputs_embeds"]),
        "last_logits": rel_err(np.array(logits[0]), t["last_logits"]),
    }
    assert max(errors.values()) <= TOLERANCE, errors


def test_text_only_skips_vision(model: DeepseekOCRForCausalLM) -> None:
    t = case_tensors("pm12_text_only")
    embeds = model.embed_inputs(t["input_ids"], None, [])
    assert rel_err(np.array(embeds[0]), t["inputs_embeds"]) == 0.0


def test_sanitize_is_idempotent(model: DeepseekOCRForCausalLM) -> None:
    raw = read_weights([MODEL_DIR / "model.safetensors"])
    once = model.sanitize(raw)
    twice = model.sanitize(dict(once))
    assert sorted(once) == sorted(twice)
    for name, value in once.items():
        assert value.shape == twice[name].shape, name
        assert bool(mx.array_equal(value, twice[name])), name
    check_weights(model, once, "fixture")
    assert "model.layers.1.mlp.experts.gate_proj.weight" in once
    assert not any(".experts.0." in name for name in once)


def test_checkpoint_errors_name_the_tensors(model: DeepseekOCRForCausalLM) -> None:
    weights = model.sanitize(read_weights([MODEL_DIR / "model.safetensors"]))
    missing = dict(weights)
    del missing["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing: model\.norm\.weight"):
        check_weights(model, missing, "x")
    extra = dict(weights, **{"model.bogus.weight": mx.zeros((2,))})
    with pytest.raises(CheckpointError, match=r"unexpected: model\.bogus\.weight"):
        check_weights(model, extra, "x")
    misshaped = dict(weights, **{"lm_head.weight": mx.zeros((3, 3))})
    with pytest.raises(CheckpointError, match=r"mis-shaped: lm_head\.weight"):
        check_weights(model, misshaped, "x")


def test_sharded_checkpoint_loads(model: DeepseekOCRForCausalLM, tmp_path: Path) -> None:
    """Official layout (per-expert names, OIHW convs) split into shards + index loads like the single file."""
    raw = read_weights([MODEL_DIR / "model.safetensors"])
    paths = save_weights(raw, tmp_path, max_shard_bytes=8 << 20)
    assert len(paths) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "config.json").write_bytes((MODEL_DIR / "config.json").read_bytes())
    sharded, _ = load_model(tmp_path, "float32")
    t = case_tensors("pm12_text_only")
    embeds = mx.array(t["inputs_embeds"])[None]
    assert bool(mx.array_equal(sharded(embeds), model(embeds)))


def test_real_checkpoint_maps_onto_real_model() -> None:
    """Every real tensor name goes through sanitize onto the model built from real_config.json with the
    right shape; nothing missing or left over. MLX is lazy: nothing of the 6.7 GB is allocated."""
    cfg = load_config(FIXTURES / "real_config.json")
    listing = json.loads((FIXTURES / "real_checkpoint_shapes.json").read_text())
    shapes: dict[str, list[int]] = listing["tensors"]
    assert len(shapes) == 2711
    real = DeepseekOCRForCausalLM(cfg)
    fake = {name: mx.zeros(shape, dtype=mx.bfloat16) for name, shape in shapes.items()}
    check_weights(real, real.sanitize(fake), "real_checkpoint_shapes.json")


def test_dimensions_come_from_config() -> None:
    """A differently sized config builds a model with those sizes (no tiny-fixture constants)."""
    data = json.loads((MODEL_DIR / "config.json").read_text())
    data.update(hidden_size=64, num_hidden_layers=4, n_routed_experts=6, num_experts_per_tok=3)
    data["projector_config"] = dict(data["projector_config"], n_embed=64)
    model = DeepseekOCRForCausalLM(parse_config(data))
    assert len(model.layers) == 4
    assert model.layers[2].mlp.experts.gate_proj.weight.shape == (6, 16, 64)
    out = model(mx.zeros((1, 5, 64)))
    assert out.shape == (1, data["vocab_size"])
