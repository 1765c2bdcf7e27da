"""Token choice for a decode batch on MLX: bans, allowed-token masks, greedy or sampling.

The arithmetic is `common.engine.sampling.reference_sample`'s (as dsocr_torch.sampling); each row samples with its own
uniform draw made on the host, so a seeded sequence picks the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from common.engine.backend import StepControls

NEG_INF = float("-inf")


def allowed_mask(words: np.ndarray, vocab_size: int) -> mx.array:
    """int32 bitmask [B, W] (host) -> bool [B, vocab_size] (bit j of word w allows id 32w + j)."""
    packed = mx.array(np.ascontiguousarray(words, dtype=np.int32)).view(mx.uint32)
    bits = (packed[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :vocab_size].astype(mx.bool_)


def apply_controls(logits: mx.array, controls: StepControls) -> mx.array:
    """Bans and allowed-token masks as -inf on float32 logits [B, V]."""
    if controls.ban_ids.size:
        logits[mx.array(controls.ban_rows.astype(np.int32)), mx.array(controls.ban_ids.astype(np.int32))] = NEG_INF
    if controls.allowed is not None:
        logits = mx.where(allowed_mask(controls.allowed, logits.shape[-1]), logits, NEG_INF)
    return logits


def choose_tokens(logits: mx.array, controls: StepControls) -> mx.array:
    """float32 logits [B, V] -> int32 token ids [B] (lazy; the caller evaluates)."""
    logits = apply_controls(logits, controls)
    tokens = mx.argmax(logits, axis=-1)
    if controls.all_greedy:
        return tokens
    sampled = np.flatnonzero(controls.temperature > 0)
    rows = mx.array(sampled.astype(np.int32))
    picked = sample_rows(
        logits[rows],
        controls.temperature[sampled],
        controls.top_k[sampled],
        controls.top_p[sampled],
        controls.uniform[sampled],
    )
    tokens[rows] = picked.astype(tokens.dtype)
    return tokens


def sample_rows(
    logits: mx.array, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, uniform: np.ndarray
) -> mx.array:
    """Samples one id per row of masked logits [R, V] by inverse CDF (see reference_sample)."""
    x = logits / mx.array(temperature.astype(np.float32))[:, None]
    u = mx.array(uniform.astype(np.float32))[:, None]
    plain = (top_k <= 0) & (top_p >= 1.0)
    out = mx.zeros((x.shape[0],), dtype=mx.int32)
    if plain.any():
        rows = mx.array(np.flatnonzero(plain).astype(np.int32))
        out[rows] = _inverse_cdf(x[rows], u[rows])
    if not plain.all():
        index = np.flatnonzero(~plain)
        rows = mx.array(index.astype(np.int32))
        out[rows] = _sample_sorted(x[rows], top_k[index], top_p[index], u[rows])
    return out


def _inverse_cdf(x: mx.array, u: mx.array) -> mx.array:
    """The first column whose cumulative probability exceeds u * total (never a zero-probability column)."""
    probs = mx.softmax(x, axis=-1)
    cumulative = mx.cumsum(probs, axis=-1)
    index = (cumulative <= u * cumulative[:, -1:]).astype(mx.int32).sum(axis=-1)
    last_possible = mx.argmax(mx.cumsum((probs > 0).astype(mx.int32), axis=-1), axis=-1)
    return mx.minimum(index, last_possible).astype(mx.int32)


def _sample_sorted(x: mx.array, top_k: np.ndarray, top_p: np.ndarray, u: mx.array) -> mx.array:
    """Top-k then top-p over candidates sorted by logit (descending, ties by id), then the draw."""
    vocab = x.shape[-1]
    # Equal logits may come in any order here (MLX's argsort is not stable); with float logits ties have
    # probability zero, and a host-side tie-break would cost a device round trip per step.
    order = mx.argsort(-x, axis=-1)
    values = mx.take_along_axis(x, order, axis=-1)
    positions = mx.arange(vocab)[None, :]
    k = mx.array(np.where(top_k > 0, top_k, vocab).astype(np.int32))[:, None]
    values = mx.where(positions >= k, NEG_INF, values)
    if (top_p < 1.0).any():
        p = mx.array(top_p.astype(np.float32))[:, None]
        probs = mx.softmax(values, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs
        drop = (before >= p) & (p < 1.0) & (positions > 0)
        values = mx.where(drop, NEG_INF, values)
    chosen = _inverse_cdf(values, u)
    return mx.take_along_axis(order, chosen[:, None], axis=-1)[:, 0].astype(mx.int32)
