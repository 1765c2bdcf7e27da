"""benchmarks/routing.py: the uniform routing spreads tokens over every expert and is undone on exit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from benchmarks.routing import routing_spread, uniform_routing  # noqa: E402
from common.model.config import load_config  # noqa: E402
from dsocr_torch.moe import MoEGate  # noqa: E402
from tests.fakes import FIXTURE_MODEL  # noqa: E402


def test_uniform_routing_spreads_tokens_and_is_undone() -> None:
    cfg = load_config(FIXTURE_MODEL).language
    experts = cfg.n_routed_experts
    model = torch.nn.Sequential(MoEGate(cfg))
    gate = model[0]
    generator = torch.Generator().manual_seed(0)  # not the global RNG: other tests' draws would change these
    torch.nn.init.normal_(gate.weight, generator=generator)
    x = torch.randn(4096, cfg.hidden_size, generator=generator) + 20 * torch.randn(cfg.hidden_size,
                                                                                    generator=generator)
    with routing_spread(model) as own:
        own_ids, own_weights = gate(x)
    with uniform_routing(model, seed=1), routing_spread(model) as spread:
        ids, weights = gate(x)
    assert own.top_share() * cfg.num_experts_per_tok > 0.9  # the degenerate routing random weights give
    assert spread.top_share() < 2.0 / experts and spread.unused_share() == 0.0
    assert torch.equal(weights, own_weights)  # the router's weights stay
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in ids.tolist())  # k distinct experts per token
    assert torch.equal(gate(x)[0], own_ids)  # undone on exit
    assert "forward" not in gate.__dict__
