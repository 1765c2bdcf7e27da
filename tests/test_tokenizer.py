"""Tokenizer goldens (ids, decodes, special ids) and the streaming detokenizer."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import pytest

from common.model.tokenizer import StreamingDetokenizer, Tokenizer
from tests.conftest import FIXTURES, MODEL_DIR, cases_manifest, model_cases


@cache
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR)


@cache
def goldens() -> dict[str, Any]:
    return json.loads((FIXTURES / "tokenizer_goldens.json").read_text())


def _golden_ids(case: dict[str, Any]) -> str:
    return repr(case["text"])[:40]


def test_special_ids_come_from_the_tokenizer() -> None:
    tok = tokenizer()
    table = goldens()["special_token_ids"]
    assert tok.bos_id == goldens()["bos_token_id"] == table["<｜begin▁of▁sentence｜>"]
    assert tok.eos_id == goldens()["eos_token_id"] == table["<｜end▁of▁sentence｜>"]
    assert tok.pad_id == goldens()["pad_token_id"] == table["<｜▁pad▁｜>"]
    assert tok.image_token_id == table["<image>"]
    for token, token_id in table.items():
        assert tok.token_to_id(token) == token_id
        assert tok.id_to_token(token_id) == token
    assert tok.vocab_size == goldens()["len_tokenizer"]


def test_goldens_count() -> None:
    assert len(goldens()["cases"]) == 36


@pytest.mark.parametrize("case", goldens()["cases"], ids=_golden_ids)
def test_golden(case: dict[str, Any]) -> None:
    tok = tokenizer()
    assert tok.encode(case["text"]) == case["ids"]
    assert [tok.bos_id, *tok.encode(case["text"])] == case["ids_add_special_tokens"]
    assert [tok.id_to_token(i) for i in case["ids"]] == case["tokens"]
    assert tok.decode(case["ids"]) == case["decode"]
    assert tok.decode(case["ids"], skip_special_tokens=True) == case["decode_skip_special"]
    assert (tok.decode(case["ids"]) == case["text"]) == case["roundtrip_exact"]


def _stream(ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = StreamingDetokenizer(tokenizer(), skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def _generated_sequences() -> list[list[int]]:
    sequences = []
    for case in model_cases():
        for key in ("greedy", "infer", "infer_eval"):
            if key in case:
                sequences.append(case[key]["ids"])
    return sequences


@pytest.mark.parametrize("skip", [False, True])
def test_stream_equals_one_shot_decode(skip: bool) -> None:
    tok = tokenizer()
    sequences = [case["ids"] for case in goldens()["cases"]] + _generated_sequences()
    assert len(sequences) == 36 + 3 * len(cases_manifest()["cases"]) + 2
    for ids in sequences:
        expected = tok.decode(ids, skip_special_tokens=skip)
        deltas = _stream(ids, skip)
        assert "".join(deltas) == expected
        if "\ufffd" not in expected:
            assert all("\ufffd" not in delta for delta in deltas)


@pytest.mark.parametrize(
    "text", ["中文龘字靐齉爩测试", "😀👍🏽🇯🇵 emoji", "日本語の鬱蠹と㐀㐁한국어", "𠀀𠀁 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓ café"]
)
def test_stream_never_splits_a_character(text: str) -> None:
    tok = tokenizer()
    ids = tok.encode(text)
    # The point of the test: some token holds only part of a character's UTF-8 bytes.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = _stream(ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)
    assert "" in deltas[:-1]  # a split character held back at least once


def test_stream_with_special_tokens_and_flush_of_incomplete_bytes() -> None:
    tok = tokenizer()
    ids = [*tok.encode("<|ref|>表格<|/ref|>"), tok.eos_id]
    assert "".join(_stream(ids)) == tok.decode(ids)
    assert "".join(_stream(ids, True)) == tok.decode(ids, skip_special_tokens=True)
    # A generation cut in the middle of a character: flush emits what one-shot decode gives (U+FFFD).
    emoji = tok.encode("😀")
    partial = emoji[:1]
    assert tok.decode(partial).endswith("\ufffd")
    detok = StreamingDetokenizer(tok)
    assert detok.add(partial[0]) == ""
    assert detok.flush() == tok.decode(partial)


def test_stream_window_stays_small() -> None:
    tok = tokenizer()
    ids = tok.encode("hello world 中文 😀 " * 400)
    detok = StreamingDetokenizer(tok)
    longest = 0
    for i in ids:
        detok.add(i)
        longest = max(longest, len(detok._ids))
    detok.flush()
    assert detok.text == tok.decode(ids)
    assert longest <= 8
