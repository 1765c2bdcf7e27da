"""dsocr_torch.sampling against common.engine.sampling.reference_sample: bans, masks, greedy, top-k, top-p, draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.engine.backend import StepControls
from common.engine.sampling import allowed_from_bitmask, reference_sample
from dsocr_torch.sampling import allowed_mask, choose_tokens

VOCAB = 1000


def controls(batch: int, rng: np.random.Generator, **columns: np.ndarray) -> StepControls:
    base = {
        "temperature": np.zeros(batch, np.float32),
        "top_k": np.zeros(batch, np.int32),
        "top_p": np.ones(batch, np.float32),
        "uniform": rng.random(batch).astype(np.float32),
        "ban_rows": np.zeros(0, np.int64),
        "ban_ids": np.zeros(0, np.int64),
    }
    base.update(columns)
    return StepControls(**base)  # type: ignore[arg-type]


def masked_reference(logits: np.ndarray, c: StepControls, row: int) -> np.ndarray:
    x = logits[row].astype(np.float64).copy()
    x[c.ban_ids[c.ban_rows == row]] = -np.inf
    if c.allowed is not None:
        x[~allowed_from_bitmask(c.allowed[row], x.shape[0])] = -np.inf
    return x


def check_draw(logits: np.ndarray, c: StepControls, row: int, chosen: int) -> None:
    """`chosen` is the reference's token, or lies next to it on a cumulative boundary within float32 rounding."""
    x = masked_reference(logits, c, row)
    expected = reference_sample(x, float(c.temperature[row]), int(c.top_k[row]), float(c.top_p[row]),
                                float(c.uniform[row]))
    if chosen == expected:
        return
    nudged = {
        reference_sample(x, float(c.temperature[row]), int(c.top_k[row]), float(c.top_p[row]), u)
        for u in (max(0.0, float(c.uniform[row]) - 1e-5), min(0.999999, float(c.uniform[row]) + 1e-5))
    }
    assert chosen in nudged, f"row {row}: chose {chosen}, reference {expected}"


def test_bitmask_unpacking_matches_the_reference() -> None:
    rng = np.random.default_rng(0)
    words = rng.integers(-(2**31), 2**31, size=(3, (VOCAB + 31) // 32), dtype=np.int64).astype(np.int32)
    on_device = allowed_mask(words, VOCAB, torch.device("cpu")).numpy()
    for row in range(3):
        np.testing.assert_array_equal(on_device[row], allowed_from_bitmask(words[row], VOCAB))


def test_greedy_rows_take_the_masked_argmax() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, VOCAB)).astype(np.float32) * 5
    top = logits.argmax(axis=1)
    words = np.full((4, (VOCAB + 31) // 32), -1, dtype=np.int32)  # all allowed...
    words[2, top[2] // 32] &= ~np.int32(1 << (top[2] % 32)) if top[2] % 32 != 31 else np.int32(0x7FFFFFFF)
    c = controls(4, rng, ban_rows=np.array([0, 0, 1]), ban_ids=np.array([top[0], 7, top[1]]), allowed=words)
    chosen = choose_tokens(torch.from_numpy(logits.copy()), c).numpy()
    for row in range(4):
        assert chosen[row] == int(np.argmax(masked_reference(logits, c, row)))
    assert chosen[0] != top[0] and chosen[1] != top[1] and chosen[2] != top[2] and chosen[3] == top[3]


@pytest.mark.parametrize("seed", range(6))
def test_sampled_rows_follow_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = 12
    logits = (rng.normal(size=(batch, VOCAB)) * rng.uniform(0.5, 6)).astype(np.float32)
    c = controls(
        batch,
        rng,
        temperature=np.where(rng.random(batch) < 0.25, 0.0, rng.uniform(0.3, 2.0, batch)).astype(np.float32),
        top_k=np.where(rng.random(batch) < 0.5, 0, rng.integers(1, 60, batch)).astype(np.int32),
        top_p=np.where(rng.random(batch) < 0.5, 1.0, rng.uniform(0.05, 0.99, batch)).astype(np.float32),
        ban_rows=rng.integers(0, batch, 40),
        ban_ids=rng.integers(0, VOCAB, 40),
    )
    chosen = choose_tokens(torch.from_numpy(logits.copy()), c).numpy()
    for row in range(batch):
        check_draw(logits, c, row, int(chosen[row]))


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    logits = np.array([[0.0, 5.0, 4.0, 1.0, 3.0]], dtype=np.float32)
    rng = np.random.default_rng(0)
    seen_k, seen_p = set(), set()
    for _ in range(200):
        c = controls(1, rng, temperature=np.array([1.0], np.float32), top_k=np.array([2], np.int32))
        seen_k.add(int(choose_tokens(torch.from_numpy(logits.copy()), c)[0]))
        # softmax: p(1)=0.64, p(2)=0.24, p(4)=0.09 ...; top_p 0.8 keeps {1, 2}
        c = controls(1, rng, temperature=np.array([1.0], np.float32), top_p=np.array([0.8], np.float32))
        seen_p.add(int(choose_tokens(torch.from_numpy(logits.copy()), c)[0]))
    assert seen_k == {1, 2} and seen_p == {1, 2}


def test_a_draw_never_lands_on_a_banned_token() -> None:
    logits = np.zeros((1, VOCAB), np.float32)
    ban = np.arange(VOCAB - 3, VOCAB)  # the last columns, where a rounded-up draw would land
    for u in (0.0, 0.5, 0.9999999):
        c = controls(1, np.random.default_rng(0), temperature=np.array([1.0], np.float32),
                     uniform=np.array([u], np.float32), ban_rows=np.zeros(3, np.int64), ban_ids=ban)
        assert int(choose_tokens(torch.from_numpy(logits.copy()), c)[0]) < VOCAB - 3
