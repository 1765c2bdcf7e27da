"""DeepSeek-OCR's SAM + CLIP encoders on every backend (float32) against the reference fixtures, SAM's internals
included (each stage's output where the fixtures store it). DeepSeek-OCR 2's encoders: test_model_parity."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from common.documents.images import load_image
from common.model.config import ModelConfig, load_config
from tests.conftest import FIXTURES, MODEL_DIR, case_tensors, cases_manifest, rel_err
from tests.helpers_backend import FAMILIES

TOLERANCE = FAMILIES["deepseek-ocr"].tolerance
SAM_PREFIX = "model.sam_model."
CLIP_PREFIX = "model.vision_model."
IMAGE_CASES = cases_manifest()["cases"]
SAM_STAGES = ("patch_embed", "neck", "net_2")  # and block<i>


class TorchEncoders:
    """The tiny checkpoint's SAM and CLIP on torch, outputs in the reference's layout; SAM's stages by hooks."""

    def __init__(self, config: ModelConfig) -> None:
        from safetensors.torch import load_file

        from dsocr_torch.clip import VitModel
        from dsocr_torch.sam import ImageEncoderViT

        weights = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(checkpoint())).items()}
        self.sam = ImageEncoderViT(config.sam).eval()
        self.sam.load_state_dict(split(weights, SAM_PREFIX), strict=True)
        self.clip = VitModel(config.clip).eval()
        self.clip.load_state_dict(split(weights, CLIP_PREFIX), strict=True)

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        watched = {name: getattr(self.sam, name) for name in SAM_STAGES}
        watched.update({f"block{i}": block for i, block in enumerate(self.sam.blocks)})
        captured: dict[str, Any] = {}
        hooks = [
            module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
            for name, module in watched.items()
        ]
        try:
            with torch.inference_mode():
                sam_out = self.sam(torch.from_numpy(pixels))
                clip_out = self.clip(sam_out)
        finally:
            for hook in hooks:
                hook.remove()
        return {**{name: value.numpy() for name, value in captured.items()},
                "sam_out": sam_out.numpy(), "clip_out": clip_out.numpy()}


class MlxEncoders:
    """The tiny checkpoint's SAM and CLIP on MLX (channels-last), outputs in the reference's layout."""

    def __init__(self, config: ModelConfig) -> None:
        import mlx.core as mx

        from dsocr_mlx import clip, sam

        weights = {name: value.astype(mx.float32) if mx.issubdtype(value.dtype, mx.floating) else value
                   for name, value in mx.load(str(checkpoint())).items()}
        self.sam = sam.ImageEncoderViT(config.sam)
        self.sam.load_weights(list(sam.sanitize(split(weights, SAM_PREFIX)).items()), strict=True)
        self.clip = clip.VitModel(config.clip)
        self.clip.load_weights(list(clip.sanitize(split(weights, CLIP_PREFIX)).items()), strict=True)

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        import mlx.core as mx

        stages: dict[str, Any] = {}
        sam_out = self.sam(mx.array(pixels.transpose(0, 2, 3, 1)), stages)
        clip_out = self.clip(sam_out)
        mx.eval(sam_out, clip_out, stages)
        # The authors' blocks are channels-last like MLX's; the neck, net_2 and SAM's output are stored NCHW.
        outputs = {name: np.array(value) for name, value in stages.items()}
        for name in ("neck", "net_2"):
            outputs[name] = outputs[name].transpose(0, 3, 1, 2)
        return {**outputs, "sam_out": np.array(sam_out).transpose(0, 3, 1, 2), "clip_out": np.array(clip_out)}


# MLX's CPU backend takes seconds a view: its stages are checked on one case per view size and tiling (every case's
# encoder outputs are checked end to end by test_model_parity on both backends).
MLX_STAGE_CASES = ("pm01_doc_base", "pm04_receipt_tall_gundam", "pm07_gray_tiny", "pm08_rgba_small")
ENCODER_CASES = [pytest.param(TorchEncoders, case, id=f"torch-{case['id']}") for case in IMAGE_CASES] + [
    pytest.param(MlxEncoders, case, id=f"mlx-{case['id']}", marks=pytest.mark.mlx)
    for case in IMAGE_CASES if case["id"] in MLX_STAGE_CASES
]


def checkpoint() -> Any:
    return MODEL_DIR / "model.safetensors"


def split(weights: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {name[len(prefix) :]: value for name, value in weights.items() if name.startswith(prefix)}


@pytest.fixture(scope="module")
def encoders(request: pytest.FixtureRequest) -> Any:
    """The backend's encoders, and their outputs cached per view (cases share views)."""
    if request.param is MlxEncoders:
        pytest.importorskip("mlx.core")
    run, cache = request.param(load_config(MODEL_DIR)), {}

    def outputs(key: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
        if key not in cache:
            cache[key] = run(np.ascontiguousarray(pixels, dtype=np.float32))
        return cache[key]

    return outputs


@pytest.mark.slow
@pytest.mark.parametrize(("encoders", "case"), ENCODER_CASES, indirect=["encoders"])
def test_vision_matches_reference(case: dict[str, Any], encoders: Any) -> None:
    from common.model.tiling import tile_image, to_image_input

    image_input = to_image_input(tile_image(load_image(FIXTURES / case["image"]), FAMILIES["deepseek-ocr"].mode(case)))
    assert (image_input.local_views is not None) == (case["n_local_crops"] > 0)
    reference = case_tensors(case["id"])
    views = {"global": (case["views"][0]["png"], image_input.global_view[None])}
    if image_input.local_views is not None:
        assert len(image_input.local_views) == case["n_local_crops"]
        views["local"] = ("+".join(v["png"] for v in case["views"][1:]), image_input.local_views)
    expected_roles = {"global", "local"} if case["n_local_crops"] else {"global"}
    assert {name.split(".")[1] for name in reference if name.startswith("vision.")} == expected_roles

    errors: dict[str, float] = {}
    for role, (key, pixels) in views.items():
        outputs = encoders(key, pixels)
        for name in ("sam_out", "clip_out"):
            errors[f"vision.{role}.{name}"] = rel_err(outputs[name], reference[f"vision.{role}.{name}"])
        stages = [name for name in reference if name.startswith(f"sam_debug.{role}.")]  # all must be captured
        for name in stages:
            errors[name] = rel_err(outputs[name.split(".")[2]], reference[name])
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= TOLERANCE, f"{worst}: {errors[worst]:.3e} (all: {errors})"
