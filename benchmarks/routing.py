"""Expert routing for benchmarks: the model's own, measured, or routing that looks like a trained model's.

Random weights route almost every token of a page to one expert (the hidden states share one dominant direction,
and a random router turns it into one winner), so a prefill timed with them runs the mixture-of-experts layers as
one dense matmul. A trained router spreads the tokens over the experts, and the grouped matmul is then slower.
`uniform_routing` keeps the router's work and its weights but replaces its choice with k distinct experts drawn
uniformly per token (seeded), which is what a well-balanced trained router looks like in aggregate;
`routing_spread` measures how concentrated a routing is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from dsocr_torch.moe import MoEGate

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _gates(model: torch.nn.Module) -> list[MoEGate]:
    return [module for module in model.modules() if isinstance(module, MoEGate)]


@contextlib.contextmanager
def _wrapped(model: torch.nn.Module, wrap: Callable[[MoEGate, Forward], Forward]) -> Iterator[None]:
    gates = _gates(model)
    before = [gate.__dict__.get("forward") for gate in gates]  # an outer block's wrapper, or None
    for gate in gates:
        gate.forward = wrap(gate, gate.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for gate, previous in zip(gates, before, strict=True):
            if previous is None:
                del gate.forward  # back to the class's forward
            else:
                gate.forward = previous  # type: ignore[method-assign]


@contextlib.contextmanager
def uniform_routing(model: torch.nn.Module, seed: int = 0) -> Iterator[None]:
    """Within the block every router picks k distinct experts uniformly at random per token (seeded)."""
    generator = torch.Generator().manual_seed(seed)

    def wrap(gate: MoEGate, forward: Forward) -> Forward:
        def routed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ids, weights = forward(x)  # the router's own cost and weight magnitudes stay
            draws = torch.rand(x.shape[0], gate.weight.shape[0], generator=generator)
            return draws.topk(gate.top_k, dim=-1).indices.to(ids.device), weights

        return routed

    with _wrapped(model, wrap):
        yield


@dataclass
class RoutingSpread:
    """Routed slots per expert, summed over the layers seen."""

    counts: list[torch.Tensor] = field(default_factory=list)  # one [experts] tensor per gate call

    def top_share(self) -> float:
        """The busiest expert's share of a layer's routed slots, averaged over calls (uniform: about 1/experts)."""
        shares = [float(c.max() / c.sum()) for c in self.counts if c.sum() > 0]
        return sum(shares) / len(shares) if shares else float("nan")

    def unused_share(self) -> float:
        """The share of experts that got no token, averaged over calls."""
        shares = [float((c == 0).float().mean()) for c in self.counts if c.sum() > 0]
        return sum(shares) / len(shares) if shares else float("nan")


@contextlib.contextmanager
def routing_spread(model: torch.nn.Module) -> Iterator[RoutingSpread]:
    """Records how the routers inside the block spread their tokens (apply it inside `uniform_routing` to see
    that routing)."""
    spread = RoutingSpread()

    def wrap(gate: MoEGate, forward: Forward) -> Forward:
        def counted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ids, weights = forward(x)
            spread.counts.append(torch.bincount(ids.reshape(-1).cpu(), minlength=gate.weight.shape[0]))
            return ids, weights

        return counted

    with _wrapped(model, wrap):
        yield spread


def describe(spread: RoutingSpread) -> dict[str, Any]:
    return {"top_expert_share": spread.top_share(), "unused_experts_share": spread.unused_share()}


@dataclass
class MoETime:
    seconds: float = 0.0  # in the MoE feed-forward layers (router, routed and shared experts)

    def flops(self, model: torch.nn.Module, tokens: int) -> float:
        """The MoE layers' matmul FLOPs for `tokens` prompt tokens (k routed + the shared experts each)."""
        lm = model.config.language  # type: ignore[union-attr]
        layers = sum(1 for i in range(lm.num_hidden_layers) if lm.is_moe_layer(i))
        per_token = 2 * 3 * lm.hidden_size * lm.moe_intermediate_size * (lm.num_experts_per_tok + lm.n_shared_experts)
        return float(layers * tokens * (per_token + 2 * lm.hidden_size * lm.n_routed_experts))


@contextlib.contextmanager
def moe_time(model: torch.nn.Module) -> Iterator[MoETime]:
    """Within the block, the time spent in the MoE feed-forward layers (CPU: their calls are synchronous)."""
    from dsocr_torch.moe import MoEFeedForward

    layers = [module for module in model.modules() if isinstance(module, MoEFeedForward)]
    total = MoETime()

    def timed(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(*args: Any, **kwargs: Any) -> torch.Tensor:
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                total.seconds += time.perf_counter() - start

        return run

    for layer in layers:
        layer.forward = timed(layer.forward)  # type: ignore[method-assign]
    try:
        yield total
    finally:
        for layer in layers:
            del layer.forward
