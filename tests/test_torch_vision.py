"""PyTorch SAM + CLIP encoders (float32, CPU) against the official fixtures, and the real checkpoint's layout."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.documents.images import load_image
from common.model.config import ModelConfig, load_config
from common.model.families import resolve_mode
from common.model.tiling import tile_image, to_image_input
from dsocr_torch import sam
from dsocr_torch.clip import VitModel
from dsocr_torch.sam import ImageEncoderViT
from tests.conftest import FIXTURES, MODEL_DIR, case_tensors, cases_manifest, rel_err

TOLERANCE = 1e-4  # max|diff| <= TOLERANCE * max|ref|
SAM_PREFIX = "model.sam_model."
CLIP_PREFIX = "model.vision_model."
IMAGE_CASES = cases_manifest()["cases"]


def _split(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {
        name[len(prefix) :]: value.float() if value.is_floating_point() else value
        for name, value in weights.items()
        if name.startswith(prefix)
    }


class Encoders:
    """The tiny checkpoint's SAM and CLIP in float32, loaded once; outputs cached per view (cases share views)."""

    def __init__(self, config: ModelConfig) -> None:
        weights = load_file(str(MODEL_DIR / "model.safetensors"))
        self.sam = ImageEncoderViT(config.sam).eval()
        self.sam.load_state_dict(_split(weights, SAM_PREFIX), strict=True)
        self.clip = VitModel(config.clip).eval()
        self.clip.load_state_dict(_split(weights, CLIP_PREFIX), strict=True)
        self.cache: dict[str, dict[str, np.ndarray]] = {}

    def run(self, key: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
        if key in self.cache:
            return self.cache[key]
        watched = {"patch_embed": self.sam.patch_embed, "neck": self.sam.neck, "net_2": self.sam.net_2}
        watched.update({f"block{i}": block for i, block in enumerate(self.sam.blocks)})
        captured: dict[str, torch.Tensor] = {}
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
        outputs = {f"debug.{name}": value.numpy() for name, value in captured.items()}
        outputs["sam_out"] = sam_out.numpy()
        outputs["clip_out"] = clip_out.numpy()
        self.cache[key] = outputs
        return outputs


@pytest.fixture(scope="module")
def encoders() -> Encoders:
    return Encoders(load_config(MODEL_DIR))


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
        outputs = encoders.run(key, np.ascontiguousarray(pixels, dtype=np.float32))
        for name in ("sam_out", "clip_out"):
            errors[f"vision.{role}.{name}"] = rel_err(outputs[name], reference[f"vision.{role}.{name}"])
        debug_prefix = f"sam_debug.{role}."
        for ref_name in (n for n in reference if n.startswith(debug_prefix)):
            errors[ref_name] = rel_err(outputs[f"debug.{ref_name[len(debug_prefix) :]}"], reference[ref_name])

    expected_roles = {"global", "local"} if case["n_local_crops"] else {"global"}
    stored = {name.split(".")[1] for name in reference if name.startswith("vision.")}
    assert stored == expected_roles
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= TOLERANCE, f"{worst}: {errors[worst]:.3e} (all: {errors})"


def test_chunked_rel_pos_attention_matches_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bias is built in slices (batch, heads or query rows); every slicing gives plain biased softmax."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, grid_h, grid_w, head_dim = 3, 4, 5, 6, 8
    tokens = grid_h * grid_w
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=gen) for _ in range(3))
    rel_h = torch.randn(batch, heads, grid_h, grid_w, grid_h, generator=gen)
    rel_w = torch.randn(batch, heads, grid_h, grid_w, grid_w, generator=gen)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, tokens, tokens)
    scores = q @ k.transpose(-1, -2) / head_dim**0.5 + bias
    expected = scores.softmax(-1) @ v
    row_bytes = grid_w * tokens * 4
    # Budgets selecting: several batch items, a few heads, a few query rows, one row at a time.
    for budget in (2 * heads * grid_h * row_bytes, 2 * grid_h * row_bytes, 2 * row_bytes, 1):
        monkeypatch.setattr(sam, "_CPU_BIAS_CHUNK_BYTES", budget)
        out = torch.full((batch, tokens, heads, head_dim), float("nan")).transpose(1, 2)
        sam.attention_with_rel_pos(q, k, v, rel_h, rel_w, out)
        assert rel_err(out, expected) <= 1e-5, budget


def test_real_config_names_and_shapes() -> None:
    """Built from the real config.json on the meta device, the encoders hold exactly the real tensors."""
    config = load_config(FIXTURES / "real_config.json")
    real = json.loads((FIXTURES / "real_checkpoint_shapes.json").read_text())["tensors"]
    with torch.device("meta"):
        modules = {SAM_PREFIX: ImageEncoderViT(config.sam), CLIP_PREFIX: VitModel(config.clip)}
    for prefix, module in modules.items():
        ours = {prefix + name: list(t.shape) for name, t in module.state_dict().items()}
        theirs = {name: shape for name, shape in real.items() if name.startswith(prefix)}
        assert sorted(set(theirs) - set(ours)) == [], "missing"
        assert sorted(set(ours) - set(theirs)) == [], "extra"
        assert {n: s for n, s in ours.items() if theirs[n] != s} == {}, "mis-shaped"
    assert modules[SAM_PREFIX].net_3.out_channels == config.sam.downsample_channels[1]
