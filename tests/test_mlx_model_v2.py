"""DeepSeek-OCR 2 on MLX (CPU, float32) against the official fixtures, and its checkpoint mapping.

Every image case runs end to end from the fixture image (SAM, Qwen2 encoder, projector, layout, decoder);
every case also runs stage by stage from the stored tensors, and generates the greedy / infer (n-gram 20) /
infer_eval (n-gram 35) ids exactly.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from common.documents.images import load_image  # noqa: E402
from common.engine.loop import GenerationLoop  # noqa: E402
from common.engine.sampling import SamplingParams  # noqa: E402
from common.model.config import load_config  # noqa: E402
from common.model.families import (
    DEEPSEEK_OCR_2,  # noqa: E402
    resolve_mode,
)
from common.model.inputs import PreparedInputs
from common.model.tiling import tile_image, to_image_input  # noqa: E402
from common.model.tokenizer import Tokenizer  # noqa: E402
from dsocr_mlx import backend as mlx_backend  # noqa: E402
from dsocr_mlx.loader import check_weights, load_model, read_weights  # noqa: E402
from dsocr_mlx.model import DeepseekOCR2Model, DeepseekOCRForCausalLM, scatter_image_embeds  # noqa: E402
from dsocr_mlx.qwen2 import encoder_attention_mask  # noqa: E402
from tests.conftest import (  # noqa: E402
    FIXTURES_V2,
    MODEL_DIR_V2,
    V2_MODE_NAMES,
    case_by_id_v2,
    case_tensors_v2,
    model_cases_v2,
    rel_err,
)

TOLERANCE = 1e-5  # max|diff| <= 1e-5 x max|ref| per tensor (the fixture README's suggestion)
CASES = [c["id"] for c in model_cases_v2()]
IMAGE_CASES = [c["id"] for c in model_cases_v2() if c.get("kind") != "lm_only"]
KINDS = {"greedy": 0, "infer": 20, "infer_eval": 35}


@pytest.fixture(scope="module")
def model() -> DeepseekOCRForCausalLM:
    mx.set_default_device(mx.cpu)
    loaded, quantization = load_model(MODEL_DIR_V2, "float32")
    assert quantization is None and isinstance(loaded.model, DeepseekOCR2Model)
    return loaded


@pytest.fixture(scope="module")
def backend() -> Any:
    loaded = mlx_backend.load(MODEL_DIR_V2, device="cpu", dtype="float32", max_batch=4, kv_cache_gib=0.25)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR_V2)


def image_input(case: dict[str, Any]) -> Any:
    mode = resolve_mode(V2_MODE_NAMES[case["mode"]], family=DEEPSEEK_OCR_2)
    return to_image_input(tile_image(load_image(FIXTURES_V2 / case["image"]), mode))


def nhwc(x: np.ndarray) -> Any:
    return mx.array(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))


def from_embeds(t: dict[str, Any]) -> PreparedInputs:
    """The case's prompt with the reference inputs_embeds (decoder parity without vision differences)."""
    ids = np.asarray(t["input_ids"], dtype=np.int64)
    return PreparedInputs(ids, np.zeros_like(ids, dtype=bool), [], inputs_embeds=t["inputs_embeds"])


def recording_sample(backend: Any, monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Each step's raw logits (row 0) as the backend samples them."""
    steps: list[np.ndarray] = []
    original = backend.sample

    def recording(logits: Any, controls: Any) -> Any:
        steps.append(np.array(logits[0].astype(mx.float32)))
        return original(logits, controls)

    monkeypatch.setattr(backend, "sample", recording)
    return steps


def check(errors: dict[str, float], case_id: str) -> None:
    worst = max(errors, key=errors.__getitem__)
    print(f"{case_id}: worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= TOLERANCE, errors


@pytest.mark.parametrize("case_id", IMAGE_CASES)
def test_end_to_end_through_vision(model: DeepseekOCRForCausalLM, case_id: str) -> None:
    """Fixture image -> preprocessing -> SAM -> Qwen2 encoder -> projector -> layout -> decoder."""
    case = case_by_id_v2(case_id)
    t = case_tensors_v2(case_id)
    image = image_input(case)
    assert list(image.crop_grid) == case["images_spatial_crop"]
    record: dict[str, Any] = {}
    embeds = model.embed_inputs(t["input_ids"], t["images_seq_mask"], [image], record)
    logits = model(embeds)
    errors: dict[str, float] = {}
    views = {k: v for k, v in record["images"][0].items() if v}
    assert set(views) == ({"global", "local"} if case["n_local_crops"] else {"global"})
    for view, outputs in views.items():
        for name, value in outputs.items():
            actual = np.array(value).transpose(0, 3, 1, 2) if name == "sam_out" else np.array(value)
            if f"vision.{view}.{name}" in t:
                errors[f"{view}.{name}"] = rel_err(actual, t[f"vision.{view}.{name}"])
    assert {f"{v}.{n}" for v in views for n in ("sam_out", "qwen2_out", "projector_out")} <= set(errors)
    errors["image_embeds"] = rel_err(np.array(record["image_embeds"]), t["image_embeds"])
    errors["inputs_embeds"] = rel_err(np.array(embeds[0]), t["inputs_embeds"])
    errors["last_logits"] = rel_err(np.array(logits[0]), t["last_logits"])
    check(errors, case_id)


@pytest.mark.parametrize("case_id", [c for c in IMAGE_CASES if "qwen2_debug.global.input" in case_tensors_v2(c)])
def test_qwen2_encoder_internals(model: DeepseekOCRForCausalLM, case_id: str) -> None:
    t = case_tensors_v2(case_id)
    errors: dict[str, float] = {}
    for view in sorted({k.split(".")[1] for k in t if k.startswith("qwen2_debug.")}):
        prefix = f"qwen2_debug.{view}."
        sam_out = nhwc(t[f"vision.{view}.sam_out"][:1])  # local debug tensors: the first crop
        features = sam_out.reshape(1, -1, sam_out.shape[-1])
        assert np.array_equal(np.array(encoder_attention_mask(features.shape[1])), t[prefix + "attn_mask_allowed"])
        trace: dict[str, Any] = {}
        full = model.model.qwen2_model(features, trace)
        errors[f"{view}.input"] = rel_err(np.array(trace["input"]), t[prefix + "input"])
        for i in range(model.config.qwen2.layers):
            errors[f"{view}.layer{i}"] = rel_err(np.array(trace[f"layer{i}"]), t[f"{prefix}layer{i}"])
        errors[f"{view}.full"] = rel_err(np.array(full), t[f"vision.{view}.qwen2_full_out"][:1])
    check(errors, case_id)


@pytest.mark.parametrize("case_id", CASES)
def test_stage_parity(model: DeepseekOCRForCausalLM, case_id: str) -> None:
    """From the stored encoder outputs: projector, image_embeds, inputs_embeds, every layer, final norm, logits."""
    t = case_tensors_v2(case_id)
    errors: dict[str, float] = {}
    embeds = model.model.embed_tokens(mx.array(t["input_ids"].astype(np.int32)))
    if "image_embeds" in t:
        projected = {}
        for view in ("global", "local"):
            if f"vision.{view}.qwen2_out" in t:
                projected[view] = model.project(mx.array(t[f"vision.{view}.qwen2_out"]))
                errors[f"{view}.projector_out"] = rel_err(np.array(projected[view]), t[f"vision.{view}.projector_out"])
        grid = tuple(int(v) for v in t["images_spatial_crop"][0])
        image_embeds = model.layout_image_tokens(projected["global"][0], projected.get("local"), grid)
        errors["image_embeds"] = rel_err(np.array(image_embeds), t["image_embeds"])
        embeds = scatter_image_embeds(embeds, t["images_seq_mask"], image_embeds)
    errors["inputs_embeds"] = rel_err(np.array(embeds), t["inputs_embeds"])
    layer_outputs: list[Any] = []
    hidden = model.hidden_states(embeds[None], layer_outputs)
    assert len(layer_outputs) == t["layer_outputs"].shape[0]
    for i, out in enumerate(layer_outputs):
        errors[f"layer{i}"] = rel_err(np.array(out[0]), t["layer_outputs"][i])
    errors["final_norm"] = rel_err(np.array(hidden[0]), t["final_norm"])
    errors["last_logits"] = rel_err(np.array(model.logits(hidden[:, -1])[0]), t["last_logits"])
    check(errors, case_id)


@pytest.mark.parametrize("case_id", CASES)
def test_token_ids_and_raw_logits_match_fixtures(
    backend: Any, tokenizer: Tokenizer, case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = case_tensors_v2(case_id)
    steps = recording_sample(backend, monkeypatch)
    kinds = [kind for kind in KINDS if f"{kind}.ids" in t]
    assert "greedy" in kinds and "infer" in kinds
    for kind in kinds:
        steps.clear()
        params = SamplingParams(max_new_tokens=32, no_repeat_ngram_size=KINDS[kind])
        ids = GenerationLoop(backend, tokenizer).submit(from_embeds(t), params).run().token_ids
        assert ids == t[f"{kind}.ids"].tolist(), kind
        ours = np.stack([s[t[f"{kind}.raw_top5_ids"][i]] for i, s in enumerate(steps)])
        assert rel_err(ours, t[f"{kind}.raw_top5_logits"]) <= TOLERANCE, kind


def test_backend_end_to_end_from_the_image(backend: Any, tokenizer: Tokenizer) -> None:
    """The MLX backend on a v2 checkpoint: real preprocessing and vision, infer()'s n-gram 20 ids."""
    case = case_by_id_v2("pm08_rgba_nocrop768")  # one 768 view: the cheapest vision path
    t = case_tensors_v2(case["id"])
    inputs = PreparedInputs(input_ids=t["input_ids"], images_seq_mask=t["images_seq_mask"], images=[image_input(case)])
    result = GenerationLoop(backend, tokenizer).submit(inputs, SamplingParams(max_new_tokens=32)).run()
    assert result.token_ids == t["infer.ids"].tolist()


def test_sanitize_is_idempotent(model: DeepseekOCRForCausalLM) -> None:
    raw = read_weights([MODEL_DIR_V2 / "model.safetensors"])
    once = model.sanitize(raw)
    twice = model.sanitize(dict(once))
    assert sorted(once) == sorted(twice)
    assert all(bool(mx.array_equal(value, twice[name])) for name, value in once.items())
    check_weights(model, once, "fixture")
    assert "model.qwen2_model.query_1024.weight" in once and "model.vision_model.pre_layrnorm.weight" not in once


def test_real_checkpoint_maps_onto_real_model() -> None:
    """Every real OCR 2 tensor name goes through sanitize onto the model built from real_config.json with the
    right shape; nothing missing or left over (MLX is lazy: nothing full-size is allocated)."""
    cfg = load_config(FIXTURES_V2 / "real_config.json")
    shapes: dict[str, list[int]] = json.loads((FIXTURES_V2 / "real_checkpoint_shapes.json").read_text())["tensors"]
    assert len(shapes) == 2707
    real = DeepseekOCRForCausalLM(cfg)
    fake = {name: mx.zeros(shape, dtype=mx.bfloat16) for name, shape in shapes.items()}
    check_weights(real, real.sanitize(fake), "real_checkpoint_shapes.json")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close(dtype: str, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half precision on MLX-CPU through vision and decoder: loosely bounded (the reference moves ~1% in bf16)."""
    half = mlx_backend.load(MODEL_DIR_V2, device="cpu", dtype=dtype, max_batch=1, kv_cache_gib=0.25)
    case = case_by_id_v2("pm08_rgba_nocrop768")  # one 768 view: the cheapest vision path
    t = case_tensors_v2(case["id"])
    inputs = PreparedInputs(input_ids=t["input_ids"], images_seq_mask=t["images_seq_mask"], images=[image_input(case)])
    steps = recording_sample(half, monkeypatch)
    params = SamplingParams(max_new_tokens=8, no_repeat_ngram_size=0)
    ids = GenerationLoop(half, tokenizer).submit(inputs, params).run().token_ids
    half.close()
    error = rel_err(steps[0], t["last_logits"])
    print(f"{dtype}: last-logit rel err {error:.2e}, greedy {ids} vs {t['greedy.ids'][:8].tolist()}")
    assert error < 0.05 and ids[0] == t["greedy.ids"][0]
