"""MLX SAM + CLIP encoders (float32, MLX on CPU) against the official fixtures, and checkpoint mapping."""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from common.documents.images import load_image
from common.errors import CheckpointError
from common.model.config import ModelConfig, load_config
from common.model.families import resolve_mode
from common.model.tiling import tile_image, to_image_input
from dsocr_mlx import clip, sam
from tests.conftest import FIXTURES, MODEL_DIR, case_tensors, cases_manifest, rel_err

TOLERANCE = 1e-4  # max|diff| <= TOLERANCE * max|ref|
SAM_PREFIX = "model.sam_model."
CLIP_PREFIX = "model.vision_model."
IMAGE_CASES = cases_manifest()["cases"]


def _split(weights: dict[str, mx.array], prefix: str) -> dict[str, mx.array]:
    return {name[len(prefix) :]: value for name, value in weights.items() if name.startswith(prefix)}


class Encoders:
    """The tiny checkpoint's SAM and CLIP, loaded once; outputs cached per view (cases share views)."""

    def __init__(self, config: ModelConfig) -> None:
        weights = {
            name: value.astype(mx.float32) if mx.issubdtype(value.dtype, mx.floating) else value
            for name, value in mx.load(str(MODEL_DIR / "model.safetensors")).items()
        }
        self.sam = sam.ImageEncoderViT(config.sam)
        self.sam.load_weights(list(sam.sanitize(_split(weights, SAM_PREFIX)).items()), strict=True)
        self.clip = clip.VitModel(config.clip)
        self.clip.load_weights(list(clip.sanitize(_split(weights, CLIP_PREFIX)).items()), strict=True)
        self.cache: dict[str, dict[str, np.ndarray]] = {}

    def run(self, key: str, pixels_nchw: np.ndarray) -> dict[str, np.ndarray]:
        if key not in self.cache:
            intermediates: dict[str, mx.array] = {}
            sam_out = self.sam(mx.array(pixels_nchw.transpose(0, 2, 3, 1)), intermediates)
            clip_out = self.clip(sam_out)
            mx.eval(sam_out, clip_out, intermediates)
            outputs = {f"debug.{name}": np.array(value) for name, value in intermediates.items()}
            outputs["sam_out"] = np.array(sam_out)
            outputs["clip_out"] = np.array(clip_out)
            self.cache[key] = outputs
        return self.cache[key]


@pytest.fixture(scope="module")
def encoders() -> Encoders:
    return Encoders(load_config(MODEL_DIR))


def _nchw(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c["id"] for c in IMAGE_CASES])
def test_vision_matches_reference(case: dict[str, Any], encoders: Encoders) -> None:
    mode = resolve_mode(
        case["mode"], base_size=case["base_size"], image_size=case["image_size"], crop_mode=case["crop_mode"]
    )
    image_input = to_image_input(tile_image(load_image(FIXTURES / case["image"]), mode))
    assert (image_input.local_views is not None) == (case["n_local_crops"] > 0)
    reference = case_tensors(case["id"])
    views = {"global": (case["views"][0]["png"], image_input.global_view[None])}
    if image_input.local_views is not None:
        assert len(image_input.local_views) == case["n_local_crops"]
        views["local"] = ("+".join(v["png"] for v in case["views"][1:]), image_input.local_views)

    errors: dict[str, float] = {}
    for role, (key, pixels) in views.items():
        out = encoders.run(key, pixels)
        errors[f"{role}.sam_out"] = rel_err(_nchw(out["sam_out"]), reference[f"vision.{role}.sam_out"])
        errors[f"{role}.clip_out"] = rel_err(out["clip_out"], reference[f"vision.{role}.clip_out"])
        for name in ("patch_embed", *(f"block{i}" for i in range(len(encoders.sam.blocks))), "neck", "net_2"):
            ref_key = f"sam_debug.{role}.{name}"
            if ref_key in reference:
                actual = out[f"debug.{name}"]
                # The authors' blocks are channels-last like ours; neck and net_2 are stored NCHW.
                errors[ref_key] = rel_err(_nchw(actual) if name in ("neck", "net_2") else actual, reference[ref_key])
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= TOLERANCE, f"{worst}: {errors[worst]:.3g} (all: {errors})"


def test_sanitize_is_idempotent_and_converts_conv_layout() -> None:
    weights = mx.load(str(MODEL_DIR / "model.safetensors"))
    for module, prefix in ((sam, SAM_PREFIX), (clip, CLIP_PREFIX)):
        torch_layout = _split(weights, prefix)
        once = module.sanitize(torch_layout)
        twice = module.sanitize(once)
        assert once.keys() == torch_layout.keys() == twice.keys()
        for name, value in torch_layout.items():
            assert mx.array_equal(once[name], twice[name]), name
            if name in module.CONV_WEIGHTS:
                assert mx.array_equal(once[name], value.transpose(0, 2, 3, 1)), name
            else:
                assert once[name] is value, name
        # Full checkpoint names are recognised too (model.py sanitises before stripping prefixes).
        prefixed = module.sanitize({prefix + name: value for name, value in torch_layout.items()})
        assert all(mx.array_equal(prefixed[prefix + name], once[name]) for name in once)


def test_sanitize_rejects_ambiguous_conv_shape() -> None:
    with pytest.raises(CheckpointError):
        sam.sanitize({"net_2.weight": mx.zeros((8, 3, 3, 3))})


def test_resize_tables() -> None:
    assert np.array_equal(sam.bicubic_antialias_matrix(16, 16), np.eye(16, dtype=np.float32))
    assert np.array_equal(sam.linear_matrix(27, 27), np.eye(27, dtype=np.float32))
    for src, dst in ((64, 40), (64, 80), (16, 10), (127, 79)):
        for matrix in (sam.bicubic_antialias_matrix(src, dst), sam.linear_matrix(src, dst)):
            assert matrix.shape == (dst, src)
            np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    # Shrinking stretches the kernel (antialias): 64 -> 32 touches 8 inputs per output, not 4.
    assert (sam.bicubic_antialias_matrix(64, 32)[10] != 0).sum() == 8


def test_real_config_checkpoint_maps_onto_modules() -> None:
    """Every real SAM/CLIP tensor name maps, after sanitize, onto a parameter of the same shape (nothing left)."""
    config = load_config(FIXTURES / "real_config.json")
    shapes: dict[str, list[int]] = json.loads((FIXTURES / "real_checkpoint_shapes.json").read_text())["tensors"]
    for module, builder, prefix in (
        (sam, lambda: sam.ImageEncoderViT(config.sam), SAM_PREFIX),
        (clip, lambda: clip.VitModel(config.clip), CLIP_PREFIX),
    ):
        model = builder()  # parameters stay lazy: nothing full-size is ever computed
        dummy = {
            name[len(prefix) :]: mx.zeros(shape, dtype=mx.int64 if name.endswith("position_ids") else mx.bfloat16)
            for name, shape in shapes.items()
            if name.startswith(prefix)
        }
        sanitized = module.sanitize(dummy)
        parameters = dict(tree_flatten(model.parameters()))
        assert sorted(sanitized) == sorted(parameters)
        mismatched = {n: (v.shape, parameters[n].shape) for n, v in sanitized.items() if v.shape != parameters[n].shape}
        assert not mismatched
        model.load_weights(list(sanitized.items()), strict=True)
