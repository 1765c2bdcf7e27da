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
    """Bans and allowed-token masks as -inf on float32 logits [B, V], in new arrays: the caller's logits stay the
    model's raw distribution (what `token_logprobs` reads after the choice; item assignment would change them)."""
    if controls.ban_ids.size:
        rows, ids = mx.array(controls.ban_rows.astype(np.int32)), mx.array(controls.ban_ids.astype(np.int32))
        logits = logits.at[rows, ids].minimum(NEG_INF)
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


def token_logprobs(logits: mx.array, tokens: mx.array, top: int) -> tuple[mx.array, mx.array, mx.array]:
    """Raw log-probabilities (log-softmax of float32 logits [B, V]; no temperature, bans or masks) of the chosen
    `tokens` [B] and of each row's `top` most likely ids, by logit descending, ties by lower id
    (`common.engine.sampling.reference_logprobs`) -> (chosen float32 [B], ids int32 [B, top], their log-probs
    float32 [B, top]); lazy, the caller evaluates."""
    x = logits.astype(mx.float32)
    logprobs = x - _logsumexp(x)
    chosen = mx.take_along_axis(logprobs, tokens.astype(mx.int32).reshape(-1, 1), axis=-1)[:, 0]
    top = min(max(top, 0), x.shape[-1])
    if top == 0:
        return chosen, mx.zeros((x.shape[0], 0), dtype=mx.int32), mx.zeros((x.shape[0], 0), dtype=mx.float32)
    # Negated keys are unique per row, so the partition and the sort of the few kept are deterministic.
    keys = -_order_key(x)
    ids = mx.argpartition(keys, kth=top - 1, axis=-1)[:, :top]
    ids = mx.take_along_axis(ids, mx.argsort(mx.take_along_axis(keys, ids, axis=-1), axis=-1), axis=-1)
    return chosen, ids.astype(mx.int32), mx.take_along_axis(logprobs, ids, axis=-1)


def _logsumexp(x: mx.array, block: int = 256) -> mx.array:
    """log(sum(exp(x))) of float32 [B, V] -> [B, 1], summed in blocks of `block` ids and then across the blocks:
    MLX's CPU adds one long row term after term in float32, 7e-4 off on a flat 129k-id row (in blocks: 1e-6)."""
    peak = mx.max(x, axis=-1, keepdims=True)
    terms = mx.exp(x - peak)
    rows, pad = x.shape[0], -x.shape[-1] % block
    if pad:
        terms = mx.concatenate([terms, mx.zeros((rows, pad), dtype=terms.dtype)], axis=-1)
    return mx.log(terms.reshape(rows, -1, block).sum(axis=-1).sum(axis=-1, keepdims=True)) + peak


def _order_key(x: mx.array) -> mx.array:
    """int64 [B, V] keys of float32 [B, V], one per id, unique within a row: larger for a larger value and, among
    equal values (-0.0 equals 0.0), for the lower id (as dsocr_torch.sampling's)."""
    bits = x.view(mx.int32).astype(mx.int64)
    ordered = mx.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # sign-magnitude -> two's complement, same order
    ids = mx.arange(x.shape[-1], dtype=mx.int64)
    return ordered * (1 << 32) + (x.shape[-1] - 1 - ids)
