"""Tokenizer goldens (ids, decodes, special ids) and the streaming detokenizer."""

from __future__ import annotations

import json
import random
from functools import cache
from typing import Any

import pytest

from common.model.tokenizer import StreamingDetokenizer, Tokenizer
from tests.conftest import FIXTURES, MODEL_DIR, cases_manifest, model_cases, model_cases_v2


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


def test_stream_keeps_up_with_the_ids() -> None:
    """Text is held back only while a character is incomplete: a few ids at most, however long the output."""
    tok = tokenizer()
    ids = tok.encode("hello world 中文 😀 " * 40)
    detok = StreamingDetokenizer(tok)
    for i, token_id in enumerate(ids):
        detok.add(token_id)
        assert tok.decode(ids[: i + 1]).startswith(detok.text)
        assert len(detok.text) >= len(tok.decode(ids[: max(0, i - 7)]))
    detok.flush()
    assert detok.text == tok.decode(ids)


class HandWrittenDetokenizer:
    """The detokenizer dsocr had before `tokenizers.decoders.DecodeStream`: kept to check the library against."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []  # the last emitted id (decoding context), then the ids not yet emitted
        self._prefix_text = ""
        self.text = ""

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        if full.endswith("\ufffd") or len(full) <= len(self._prefix_text) or not full.startswith(self._prefix_text):
            return ""
        delta = full[len(self._prefix_text) :]
        self._ids = self._ids[-1:]
        self._prefix_text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        self.text += delta
        return delta

    def flush(self) -> str:
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        delta = full[len(self._prefix_text) :] if full.startswith(self._prefix_text) else ""
        self._ids, self._prefix_text = [], ""
        self.text += delta
        return delta


def _deltas(detok: Any, ids: list[int]) -> list[str]:
    return [*(detok.add(i) for i in ids), detok.flush()]


def _comparison_sequences() -> list[list[int]]:
    """Every generated sequence in both fixture sets, the goldens, and random ids that stress the boundaries."""
    tok = tokenizer()
    sequences = [case["ids"] for case in goldens()["cases"]] + _generated_sequences()
    sequences += [case[key]["ids"] for case in model_cases_v2() for key in ("greedy", "infer", "infer_eval")
                  if key in case]
    vocab = tok.vocab_size
    partial = [i for i in range(vocab) if "\ufffd" in tok.decode([i])]  # ids holding part of a character
    assert len(partial) > 100
    special = [tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id, *range(vocab - 40, vocab)]
    rng = random.Random(1234)
    pools = [lambda: rng.randrange(vocab), lambda: rng.choice(partial), lambda: rng.choice(special),
             lambda: rng.randrange(vocab, vocab + 400)]  # the model's vocabulary is larger than the tokenizer's
    for _ in range(400):
        weights = rng.choice([(1, 0, 0, 0), (1, 1, 0, 0), (1, 1, 1, 0), (0, 1, 0, 0), (1, 3, 1, 1)])
        sequences.append([rng.choices(pools, weights)[0]() for _ in range(rng.randint(1, 80))])
    return sequences


@pytest.mark.parametrize("skip", [False, True])
def test_library_stream_is_identical_to_the_hand_written_one(skip: bool) -> None:
    tok = tokenizer()
    for ids in _comparison_sequences():
        ours = _deltas(HandWrittenDetokenizer(tok, skip), ids)
        assert _deltas(StreamingDetokenizer(tok, skip), ids) == ours, ids  # the same deltas at the same ids


# ---- token bytes and text (OpenAI's logprobs `bytes` and `token`) --------------------------------------------

SPLIT_TEXTS = ["中文龘字靐齉爩测试", "😀👍🏽🇯🇵 emoji", "日本語の鬱蠹と㐀㐁한국어", "𠀀𠀁 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓ café"]


def _fixture_generated_sequences() -> list[list[int]]:
    """Every generated sequence of both fixture sets: cases.json's runs and the case tensors' `<run>.ids`."""
    from tests.helpers_backend import FAMILIES

    sequences = []
    for fixtures in FAMILIES.values():
        for case in fixtures.cases():
            tensors = fixtures.tensors(case["id"])
            for run in ("greedy", "infer", "infer_eval"):
                if run in case:
                    sequences.append([int(i) for i in case[run]["ids"]])
                if f"{run}.ids" in tensors:
                    sequences.append(tensors[f"{run}.ids"].tolist())
    return sequences


def test_token_bytes_add_up_to_the_decode() -> None:
    tok = tokenizer()
    generated = _fixture_generated_sequences()
    assert len(generated) >= 2 * 2 * (len(model_cases()) + len(model_cases_v2()))  # greedy and infer, twice
    split = [tok.encode(text) for text in SPLIT_TEXTS]
    exact = 0
    for ids in generated + split + _comparison_sequences():
        joined = b"".join(tok.token_bytes(i) for i in ids)
        text = tok.decode(ids)
        assert joined.decode("utf-8", errors="replace") == text, ids
        if "\ufffd" not in text:  # a sequence cut inside a character decodes lossily; the others exactly
            assert joined == text.encode("utf-8"), ids
            exact += 1
    assert exact > len(generated)
    for text, ids in zip(SPLIT_TEXTS, split, strict=True):
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
        parts = [tok.token_bytes(i) for i in ids]
        assert any(_partial(part) for part in parts), text  # some id holds part of a character
        assert [tok.token_text(i) for i in ids] == [part.decode("utf-8", errors="replace") for part in parts]


def _partial(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_token_bytes_and_text_of_single_ids() -> None:
    tok = tokenizer()
    # Every id alone: the text is what decode shows, the bytes exactly its UTF-8 where it is whole.
    for token_id in range(tok.vocab_size):
        text = tok.token_text(token_id)
        assert text == tok.decode([token_id]), token_id
        if "\ufffd" not in text:
            assert tok.token_bytes(token_id) == text.encode("utf-8"), token_id
    # Byte-level letters: Ġ is a space, Ċ a newline; a leading space belongs to the word.
    hello = tok.encode(" hello\n")
    assert b"".join(tok.token_bytes(i) for i in hello) == b" hello\n"
    assert tok.token_bytes(hello[0]).startswith(b" ") and "Ġ" in (tok.id_to_token(hello[0]) or "")
    # Special and added tokens: their content; past the tokenizer's vocabulary (the model's is larger): nothing.
    assert tok.token_bytes(tok.eos_id) == "<｜end▁of▁sentence｜>".encode()
    assert tok.token_text(tok.bos_id) == "<｜begin▁of▁sentence｜>"
    assert tok.token_bytes(tok.image_token_id) == b"<image>"
    assert tok.token_bytes(tok.token_to_id("<td>") or -1) == b"<td>"
    assert tok.token_bytes(tok.vocab_size + 5) == b"" and tok.token_text(tok.vocab_size + 5) == ""
    # A character cut in two: each half is its raw bytes, shown as U+FFFD.
    emoji = tok.encode("😀")
    assert len(emoji) > 1 and b"".join(tok.token_bytes(i) for i in emoji) == "😀".encode()
    assert tok.token_text(emoji[0]) == "\ufffd"
