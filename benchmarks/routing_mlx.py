"""Expert routing for the MLX benchmarks: what benchmarks/routing.py does for torch (random weights route almost
every token of a page to one expert; a trained router spreads them), for dsocr_mlx's MoEGate.

The gate's class is patched for the duration of the block (MLX calls a module through its type, so an instance
attribute would not be seen); the engine core's thread, which runs every MLX call, sees the patch too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from dsocr_mlx.language import MoEGate


@contextlib.contextmanager
def uniform_routing(seed: int = 0) -> Iterator[None]:
    """Within the block every router picks k distinct experts uniformly at random per token (seeded); the
    router's own work and its weights' magnitudes stay."""
    own = MoEGate.__call__
    key = [mx.random.key(seed)]

    def routed(gate: MoEGate, x: mx.array) -> tuple[mx.array, mx.array]:
        indices, weights = own(gate, x)
        key[0], draw = mx.random.split(key[0])
        scores = mx.random.uniform(shape=(*x.shape[:-1], gate.weight.shape[0]), key=draw)
        chosen = mx.argpartition(-scores, kth=gate.top_k - 1, axis=-1)[..., : gate.top_k]
        return chosen.astype(indices.dtype), weights

    MoEGate.__call__ = routed  # type: ignore[method-assign]
    try:
        yield
    finally:
        MoEGate.__call__ = own  # type: ignore[method-assign]


@dataclass
class RoutingSpread:
    """Routed slots per expert, one count per gate call with more than one token (a prompt, not a decode step)."""

    counts: list[np.ndarray] = field(default_factory=list)

    def top_share(self) -> float:
        """The busiest expert's share of a layer's routed slots, averaged over calls (uniform: about 1/experts)."""
        shares = [float(c.max() / c.sum()) for c in self.counts if c.sum() > 0]
        return sum(shares) / len(shares) if shares else float("nan")


@contextlib.contextmanager
def routing_spread() -> Iterator[RoutingSpread]:
    """Records how the routers inside the block spread a prompt's tokens (inside `uniform_routing`: that one's)."""
    spread = RoutingSpread()
    inner = MoEGate.__call__

    def counted(gate: MoEGate, x: mx.array) -> tuple[mx.array, mx.array]:
        indices, weights = inner(gate, x)
        flat = np.asarray(indices.reshape(-1, indices.shape[-1]))
        if flat.shape[0] > 1:
            spread.counts.append(np.bincount(flat.reshape(-1), minlength=gate.weight.shape[0]))
        return indices, weights

    MoEGate.__call__ = counted  # type: ignore[method-assign]
    try:
        yield spread
    finally:
        MoEGate.__call__ = inner  # type: ignore[method-assign]
