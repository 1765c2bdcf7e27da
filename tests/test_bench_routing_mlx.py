"""benchmarks/routing_mlx.py: MLX's uniform routing spreads a prompt's tokens over every expert and is undone."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from benchmarks.routing_mlx import routing_spread, uniform_routing  # noqa: E402
from common.model.config import load_config  # noqa: E402
from dsocr_mlx.language import MoEGate  # noqa: E402
from tests.fakes import FIXTURE_MODEL  # noqa: E402


def test_uniform_routing_spreads_tokens_and_is_undone() -> None:
    cfg = load_config(FIXTURE_MODEL).language
    experts, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    gate = MoEGate(cfg)
    rng = np.random.default_rng(0)
    gate.weight = mx.array(rng.standard_normal((experts, cfg.hidden_size)).astype(np.float32))
    # One dominant direction shared by every token, as random weights' hidden states have.
    x = mx.array((rng.standard_normal((4096, cfg.hidden_size)) + 20 * rng.standard_normal(cfg.hidden_size))
                 .astype(np.float32))
    with routing_spread() as own:
        own_ids, own_weights = gate(x)
    with uniform_routing(seed=1), routing_spread() as spread:
        ids, weights = gate(x)
    assert own.top_share() * k > 0.9  # the degenerate routing random weights give
    assert spread.top_share() < 2.0 / experts
    assert np.bincount(np.asarray(ids).reshape(-1), minlength=experts).min() > 0  # every expert used
    assert np.array_equal(np.asarray(weights), np.asarray(own_weights))  # the router's weights stay
    assert all(len(set(row)) == k for row in np.asarray(ids).tolist())  # k distinct experts per token
    assert np.array_equal(np.asarray(gate(x)[0]), np.asarray(own_ids))  # undone on exit
