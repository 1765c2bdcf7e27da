"""What only the torch vision encoders have: SAM's sliced relative-position attention, and the real checkpoint's
names and shapes (their parity with the reference: test_model_vision)."""

from __future__ import annotations

import json

import pytest
import torch

from common.model.config import load_config
from dsocr_torch import sam
from dsocr_torch.clip import VitModel
from dsocr_torch.sam import ImageEncoderViT
from tests.conftest import FIXTURES, rel_err

SAM_PREFIX = "model.sam_model."
CLIP_PREFIX = "model.vision_model."


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


@pytest.mark.slow
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
