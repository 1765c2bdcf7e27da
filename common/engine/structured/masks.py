"""Allowed-token bitmasks in llguidance's layout (int32 rows, bit t % 32 of word t // 32 allows id t)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def allocate_masks(batch_size: int, vocab_size: int) -> np.ndarray:
    """A [batch_size, mask_width] int32 array with every id allowed."""
    return np.full((batch_size, mask_width(vocab_size)), -1, dtype=np.int32)


def bitmask_to_bool(masks: np.ndarray, vocab_size: int) -> np.ndarray:
    """Bool [..., vocab_size] view of int32 bitmask rows (True = allowed)."""
    words = np.ascontiguousarray(masks, dtype="<i4")
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :vocab_size].astype(bool)


def allowed_ids(mask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """Ids a bitmask row allows, ascending."""
    return np.flatnonzero(bitmask_to_bool(mask_row, vocab_size))


def _is_allowed(mask_row: np.ndarray, token_id: int) -> bool:
    return bool((int(mask_row[token_id >> 5]) >> (token_id & 31)) & 1)


def _allows_more_than(mask_row: np.ndarray, count: int) -> bool:
    """Whether the row allows more than `count` ids; exact bit counting only on the few non-zero words."""
    words = mask_row[np.flatnonzero(mask_row)]
    if words.size > count:
        return True  # each non-zero word allows at least one id
    return int(np.unpackbits(np.ascontiguousarray(words, dtype="<i4").view(np.uint8)).sum()) > count


def ban_within_grammar(mask_row: np.ndarray, banned: Sequence[int]) -> list[int]:
    """The part of an n-gram ban list to apply on top of a grammar mask row.

    Both rules hold together: the result is the banned ids the grammar allows (the others are masked anyway).
    When those are ALL the ids the grammar allows, the ban yields and `[]` is returned: the grammar is the
    hard guarantee (only it keeps the output parseable), the n-gram guard is a heuristic against loops.
    """
    hits = [int(t) for t in banned if 0 <= int(t) < mask_row.shape[-1] * 32 and _is_allowed(mask_row, int(t))]
    if not hits or not _allows_more_than(mask_row, len(set(hits))):
        return []
    return hits


