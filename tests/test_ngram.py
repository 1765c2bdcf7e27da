"""No-repeat n-gram guard: constructed sequences, incremental == reference, the fixtures' generation runs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from common.engine.ngram import NGramGuard, banned_ngram_tokens
from common.engine.sampling import ngram_whitelist_ids
from tests.conftest import FIXTURES, fixture_tokenizer, model_cases

VLLM_NGRAM_WHITELIST = ngram_whitelist_ids(fixture_tokenizer())  # <td>, </td> by token text
TD, TD_CLOSE = VLLM_NGRAM_WHITELIST


def case_ids(case_id: str, key: str) -> list[int]:
    """One int64 tensor of cases/<id>.safetensors, read alone (cheap; independent of the float entries)."""
    with safe_open(str(FIXTURES / "cases" / f"{case_id}.safetensors"), framework="np") as f:
        return [int(v) for v in f.get_tensor(key)]


def guard_trace(guard: NGramGuard, prompt: list[int], generated: list[int]) -> list[list[int]]:
    """Ban list before each generated token."""
    guard.reset(prompt)
    trace = []
    for token in generated:
        trace.append(guard.banned())
        guard.push(token)
    trace.append(guard.banned())
    return trace


# ------------------------------------------------------------------------------------------ reference rule


def test_disabled_when_n_is_zero() -> None:
    assert banned_ngram_tokens([1, 2, 1, 2, 1], 0) == []
    guard = NGramGuard(0)
    guard.reset([1, 2, 1, 2, 1])
    guard.push(2)
    assert guard.banned() == []
    assert not guard.enabled


def test_bigram_bans_the_follower_of_the_last_token() -> None:
    # ... 5 7 ... 5 -> 7 would repeat the bigram (5, 7)
    assert banned_ngram_tokens([5, 7, 9, 5], 2) == [7]
    # two different followers of 5 are both banned
    assert banned_ngram_tokens([5, 7, 5, 8, 5], 2) == [7, 8]
    # last token never seen before: nothing banned
    assert banned_ngram_tokens([5, 7, 9], 2) == []


def test_trigram_needs_the_whole_prefix() -> None:
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 3, 4, 2], 3) == []  # prefix (4, 2) is new
    assert banned_ngram_tokens([1, 2, 3, 9, 1, 2], 3) == [3]


def test_sequence_shorter_than_n() -> None:
    assert banned_ngram_tokens([], 3) == []
    assert banned_ngram_tokens([4], 3) == []
    assert banned_ngram_tokens([4, 4], 3) == []  # prefix exists but no complete trigram yet
    assert banned_ngram_tokens([4, 4, 4], 3) == [4]


def test_unigram_bans_every_token_seen() -> None:
    # Hugging Face with no_repeat_ngram_size=1: the empty prefix matches every unigram.
    assert banned_ngram_tokens([], 1) == []
    assert banned_ngram_tokens([9, 3, 9, 5], 1) == [3, 5, 9]
    guard = NGramGuard(1)
    guard.reset([9, 3])
    guard.push(9)
    guard.push(5)
    assert guard.banned() == [3, 5, 9]


def test_whitelist_is_never_banned() -> None:
    seq = [TD, 10, TD_CLOSE, TD, 10, TD_CLOSE, TD]
    assert banned_ngram_tokens(seq, 2) == [10]
    seq2 = [10, TD, 11, 10]
    assert banned_ngram_tokens(seq2, 2) == [TD]
    assert banned_ngram_tokens(seq2, 2, whitelist=VLLM_NGRAM_WHITELIST) == []
    assert banned_ngram_tokens(seq2, 2, window=10, whitelist=VLLM_NGRAM_WHITELIST) == []
    guard = NGramGuard(2, window=10, whitelist=VLLM_NGRAM_WHITELIST)
    guard.reset()
    for token in seq2:
        guard.push(token)
    assert guard.banned() == []


def test_window_boundary() -> None:
    # bigram (1, 2) starts at index 0; current prefix is the final 1 (index L-1).
    seq = [1, 2, 7, 8, 9, 1]  # L = 6
    # window 6 covers indexes 0..5: the n-gram (1, 2) at 0..1 is inside.
    assert banned_ngram_tokens(seq, 2, window=6) == [2]
    # window 5 covers 1..5: the n-gram starting at 0 is outside.
    assert banned_ngram_tokens(seq, 2, window=5) == []
    # a window as large as the sequence (or larger) equals the whole-sequence rule
    assert banned_ngram_tokens(seq, 2, window=100) == banned_ngram_tokens(seq, 2)
    # an n-gram is only counted when it lies wholly inside the window: trigram (1, 2, 3) at 0..2
    seq3 = [1, 2, 3, 5, 1, 2]  # L = 6
    assert banned_ngram_tokens(seq3, 3, window=6) == [3]
    assert banned_ngram_tokens(seq3, 3, window=5) == []


def test_vllm_recipe_table_row() -> None:
    # A repeated table row: the repeated cell content is banned, <td>/</td> are not.
    row = [128823] + [TD, 500, TD_CLOSE, TD, 501, TD_CLOSE] * 6 + [128824]  # 38 tokens
    # prefix = <tr> + 28 tokens of the row: only one earlier occurrence, followed by 501
    seq = row + row[:29]
    assert banned_ngram_tokens(seq, 30, window=90, whitelist=VLLM_NGRAM_WHITELIST) == [501]
    # prefix = 29 tokens inside the row: earlier occurrences are followed by <td> and by </tr>
    seq_td = row + row[:31]
    assert banned_ngram_tokens(seq_td, 30, window=90) == [TD, 128824]
    assert banned_ngram_tokens(seq_td, 30, window=90, whitelist=VLLM_NGRAM_WHITELIST) == [128824]
    # beyond the window the same row is allowed again, the whole-sequence rule still bans it
    far = row + list(range(1000, 1070)) + row[:29]
    assert banned_ngram_tokens(far, 30, window=90, whitelist=VLLM_NGRAM_WHITELIST) == []
    assert banned_ngram_tokens(far, 30, whitelist=VLLM_NGRAM_WHITELIST) == [501]


def test_windowed_guard_ignores_the_prompt_by_default() -> None:
    prompt = [1, 2, 3, 1, 2]
    guard = NGramGuard(3, window=90)
    guard.reset(prompt)
    assert guard.banned() == []  # vLLM hands the processor the generated tokens only
    guard_full = NGramGuard(3)
    guard_full.reset(prompt)
    assert guard_full.banned() == [3]  # Hugging Face rule looks at the prompt too
    guard_with_prompt = NGramGuard(3, window=90, include_prompt=True)
    guard_with_prompt.reset(prompt)
    assert guard_with_prompt.banned() == [3]


def test_reset_clears_history() -> None:
    guard = NGramGuard(2)
    guard.reset([4, 5, 4])
    assert guard.banned() == [5]
    guard.reset([6])
    assert guard.banned() == []


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        NGramGuard(-1)
    with pytest.raises(ValueError):
        NGramGuard(3, window=-2)


# ---------------------------------------------------------------------------- incremental == reference


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=80),
    n=st.integers(min_value=0, max_value=6),
    prompt_len=st.integers(min_value=0, max_value=20),
    window=st.sampled_from([0, 0, 6, 9, 25]),
    whitelist=st.sampled_from([(), (0,), (1, 3)]),
)
def test_guard_matches_reference(
    tokens: list[int], n: int, prompt_len: int, window: int, whitelist: tuple[int, ...]
) -> None:
    prompt, generated = tokens[:prompt_len], tokens[prompt_len:]
    guard = NGramGuard(n, window, whitelist)
    trace = guard_trace(guard, prompt, generated)
    for step, banned in enumerate(trace):
        history = prompt + generated[:step] if window == 0 else generated[:step]
        assert banned == banned_ngram_tokens(history, n, window, whitelist)


def test_guard_matches_reference_long_random() -> None:
    # Long sequences with a small vocabulary so that repeats are frequent; also crosses the history trim.
    rng = np.random.default_rng(20)
    for n, window, vocab in [(3, 0, 4), (20, 0, 3), (4, 12, 3), (30, 90, 2), (1, 0, 50)]:
        tokens = rng.integers(0, vocab, size=600).tolist()
        prompt, generated = tokens[:100], tokens[100:]
        trace = guard_trace(NGramGuard(n, window), prompt, generated)
        for step in range(0, len(generated) + 1, 7):
            history = prompt + generated[:step] if window == 0 else generated[:step]
            assert trace[step] == banned_ngram_tokens(history, n, window), (n, window, step)


# ---------------------------------------------------------------------------------- fixture generation runs


RUN_KWARGS = {"infer": "generate_kwargs_infer", "infer_eval": "generate_kwargs_infer_eval_mode"}


def _runs() -> list[tuple[str, str, int]]:
    """(case, run, its no_repeat_ngram_size) of every reference run: infer() and infer(eval_mode) for each image
    case, infer() for the text-only one (which stores no generate kwargs: the image cases' n applies)."""
    images = [c for c in model_cases() if c.get("kind") == "model"]
    sizes = {run: {c[key]["no_repeat_ngram_size"] for c in images} for run, key in RUN_KWARGS.items()}
    assert all(len(n) == 1 for n in sizes.values()), sizes
    runs = []
    for case in model_cases():
        for run in RUN_KWARGS if case.get("kind") == "model" else ("infer",):
            runs.append((case["id"], run, *sizes[run]))
    return runs


@pytest.mark.parametrize(("case_id", "run", "n"), _runs())
def test_fixture_runs(case_id: str, run: str, n: int) -> None:
    case = next(c for c in model_cases() if c["id"] == case_id)
    if case.get("kind") == "model":
        assert case[RUN_KWARGS[run]]["no_repeat_ngram_size"] == n
    prompt, generated, greedy = (case_ids(case_id, key) for key in ("input_ids", f"{run}.ids", "greedy.ids"))
    record = case[run]
    assert generated == record["ids"]

    guard = NGramGuard(n)
    trace = guard_trace(guard, prompt, generated)[: len(generated)]
    assert [len(b) for b in trace] == record["n_banned_per_step"]
    for step, (banned, token) in enumerate(zip(trace, generated, strict=True)):
        assert token not in banned, f"step {step}: generated {token} is banned"
    for step in record["steps_where_ngram_ban_changed_choice"]:
        assert greedy[:step] == generated[:step]
        assert greedy[step] in trace[step]
        assert greedy[step] != generated[step]
    # the guard is what separates infer from plain greedy: up to the first change they agree
    changed = record["steps_where_ngram_ban_changed_choice"]
    if not changed:
        assert generated == greedy
