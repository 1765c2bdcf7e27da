"""Token choice for a decode batch on the model's device: bans, allowed-token masks, greedy or sampling.

The arithmetic is `common.engine.sampling.reference_sample`'s, row by row; each row samples with its own uniform draw
(made on the host by the sequence's own generator), so no device random state is shared between sequences.
"""

from __future__ import annotations

import numpy as np
import torch

from common.engine.backend import StepControls

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def allowed_mask(words: np.ndarray, vocab_size: int, device: torch.device) -> torch.Tensor:
    """int32 bitmask [B, W] (host) -> bool [B, vocab_size] on `device` (bit j of word w allows id 32w + j)."""
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(32, device=device, dtype=torch.int32)
    packed = torch.from_numpy(np.ascontiguousarray(words, dtype=np.int32)).to(device, non_blocking=True)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(packed.shape[0], -1)[:, :vocab_size].bool()


def apply_controls(logits: torch.Tensor, controls: StepControls) -> torch.Tensor:
    """Bans and allowed-token masks as -inf on float32 logits [B, V], in a copy made only when there is something
    to apply: the caller's logits stay the model's raw distribution (what `token_logprobs` reads after the choice)."""
    copied = False
    if controls.ban_ids.size:
        rows = torch.from_numpy(controls.ban_rows).to(logits.device, non_blocking=True)
        ids = torch.from_numpy(controls.ban_ids).to(logits.device, non_blocking=True)
        logits = logits.index_put((rows, ids), torch.tensor(float("-inf"), device=logits.device))
        copied = True
    if controls.allowed is not None:
        banned = ~allowed_mask(controls.allowed, logits.shape[-1], logits.device)
        logits = logits.masked_fill_(banned, float("-inf")) if copied else logits.masked_fill(banned, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, controls: StepControls) -> torch.Tensor:
    """float32 logits [B, V] -> int64 token ids [B] on the device (no host sync on an all-greedy batch)."""
    logits = apply_controls(logits, controls)
    tokens = torch.argmax(logits, dim=-1)
    if controls.all_greedy:
        return tokens
    sampled = np.flatnonzero(controls.temperature > 0)
    rows = torch.from_numpy(sampled).to(logits.device)
    picked = sample_rows(
        logits.index_select(0, rows),
        controls.temperature[sampled],
        controls.top_k[sampled],
        controls.top_p[sampled],
        controls.uniform[sampled],
    )
    return tokens.index_copy(0, rows, picked)


def sample_rows(
    logits: torch.Tensor, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, uniform: np.ndarray
) -> torch.Tensor:
    """Samples one id per row of masked logits [R, V] by inverse CDF (see reference_sample)."""
    device = logits.device

    def column(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to(device=device, dtype=dtype).unsqueeze(-1)

    x = logits / column(temperature, torch.float32)
    u = column(uniform, torch.float32)
    plain = (top_k <= 0) & (top_p >= 1.0)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=device)
    if plain.any():
        rows = np.flatnonzero(plain)
        index = torch.from_numpy(rows).to(device)
        out[index] = _inverse_cdf(x.index_select(0, index), u.index_select(0, index))
    if not plain.all():
        rows = np.flatnonzero(~plain)
        index = torch.from_numpy(rows).to(device)
        out[index] = _sample_sorted(
            x.index_select(0, index), top_k[rows], top_p[rows], u.index_select(0, index)
        )
    return out


def _inverse_cdf(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw in column order: the first column whose cumulative probability exceeds u * total.

    Rounding can put u * total at the very end of the cumulative sum; the draw then takes the last column
    with a non-zero probability, never a masked one.
    """
    probs = torch.softmax(x, dim=-1)
    cumulative = probs.cumsum(dim=-1)
    index = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True)
    last_possible = (probs > 0).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    return torch.minimum(index, last_possible).squeeze(-1)


def _sample_sorted(x: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, u: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p over candidates sorted by logit (descending, ties by id), then the draw."""
    device = x.device
    k_max = int(top_k.max()) if (top_k > 0).all() else 0
    if 0 < k_max < x.shape[-1]:
        values, order = torch.topk(x, k_max, dim=-1, sorted=True)
        # topk does not promise an order among equal values; re-sort them by id like a stable sort would.
        values, resort = _stable_desc(values, order)
        order = order.gather(-1, resort)
    else:
        values, order = torch.sort(x, dim=-1, descending=True, stable=True)
    positions = torch.arange(values.shape[-1], device=device)
    k = torch.from_numpy(np.where(top_k > 0, top_k, values.shape[-1]).astype(np.int64)).to(device).unsqueeze(-1)
    values = values.masked_fill(positions >= k, float("-inf"))
    if (top_p < 1.0).any():
        p = torch.from_numpy(np.ascontiguousarray(top_p, dtype=np.float32)).to(device).unsqueeze(-1)
        probs = torch.softmax(values, dim=-1)
        before = probs.cumsum(dim=-1) - probs
        drop = (before >= p) & (p < 1.0)
        drop[:, 0] = False
        values = values.masked_fill(drop, float("-inf"))
    return order.gather(-1, _inverse_cdf(values, u).unsqueeze(-1)).squeeze(-1)


def _stable_desc(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorts each row by value descending, then by id ascending; returns (values, permutation)."""
    by_id = torch.argsort(ids, dim=-1, stable=True)
    by_value = torch.sort(values.gather(-1, by_id), dim=-1, descending=True, stable=True).indices
    perm = by_id.gather(-1, by_value)
    return values.gather(-1, perm), perm


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw log-probabilities (log-softmax of float32 logits [B, V]; no temperature, bans or masks) of the chosen
    `tokens` [B] and of each row's `top` most likely ids, by logit descending, ties by lower id
    (`common.engine.sampling.reference_logprobs`) -> (float32 [B, 1 + top]: the chosen id's, then the top ones;
    int64 ids [B, top]), on the device, with no host synchronisation."""
    x = logits.float()
    logprobs = torch.log_softmax(x, dim=-1)
    chosen = logprobs.gather(-1, tokens.to(device=x.device, dtype=torch.int64).view(-1, 1))
    if top <= 0:
        return chosen, torch.empty((x.shape[0], 0), dtype=torch.int64, device=x.device)
    ids = torch.topk(_order_key(x), min(top, x.shape[-1]), dim=-1, sorted=True).indices
    return torch.cat([chosen, logprobs.gather(-1, ids)], dim=-1), ids


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 [B, V] keys of float32 [B, V], one per id, unique within a row: larger for a larger value and, among
    equal values (-0.0 equals 0.0), for the lower id, so a top-k of the keys is deterministic."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # sign-magnitude -> two's complement, same order
    ids = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    return ordered * (1 << 32) + (x.shape[-1] - 1 - ids)
