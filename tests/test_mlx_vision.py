"""What only the MLX vision encoders have: the checkpoint's conv layouts converted by `sanitize`, the resize tables,
and the real checkpoint mapped onto them (their parity with the reference: test_model_vision)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from common.errors import CheckpointError
from common.model.config import load_config
from dsocr_mlx import clip, sam
from tests.conftest import FIXTURES, MODEL_DIR

pytestmark = pytest.mark.mlx

SAM_PREFIX = "model.sam_model."
CLIP_PREFIX = "model.vision_model."


def _split(weights: dict[str, mx.array], prefix: str) -> dict[str, mx.array]:
    return {name[len(prefix) :]: value for name, value in weights.items() if name.startswith(prefix)}


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
