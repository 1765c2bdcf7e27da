"""The DeepSeek-OCR tokenizer (byte-level BPE) on the `tokenizers` library, and a streaming detokenizer.

`encode` is what the official `text_encode` does (`tokenizer.encode(text, add_special_tokens=False)`);
special ids are looked up by the token strings named in tokenizer_config.json / special_tokens_map.json,
never hard-coded.
`clean_up_tokenization_spaces` is false in the official config, so `decode` is the raw library decode.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from common.errors import ModelNotFoundError

IMAGE_TOKEN = "<image>"


def _token_content(value: Any) -> str | None:
    """special_tokens_map / tokenizer_config store a token either as a string or as {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Tokenizer:
    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        bos_token: str,
        eos_token: str,
        pad_token: str | None,
        image_token: str = IMAGE_TOKEN,
    ) -> None:
        self._tokenizer = tokenizer
        self.bos_id = self._require_id(bos_token, "BOS")
        self.eos_id = self._require_id(eos_token, "EOS")
        self.pad_id = self._require_id(pad_token, "PAD") if pad_token is not None else self.eos_id
        self.image_token_id = self._require_id(image_token, "image")

    def _require_id(self, token: str, what: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelNotFoundError(
                f"tokenizer.json has no {what} token {token!r}; the model directory is broken"
            )
        return int(token_id)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFoundError(f"no tokenizer.json in {model_dir}; pass a DeepSeek-OCR model directory")
        try:
            tokenizer = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception on malformed files
            raise ModelNotFoundError(f"cannot load {path}: {exc}") from None
        # special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        config = _read_json(model_dir / "tokenizer_config.json")
        special_map = _read_json(model_dir / "special_tokens_map.json")

        def pick(key: str, default: str | None) -> str | None:
            for source in (special_map, config):
                content = _token_content(source.get(key))
                if content is not None:
                    return content
            return default

        bos = pick("bos_token", "<｜begin▁of▁sentence｜>")
        eos = pick("eos_token", "<｜end▁of▁sentence｜>")
        pad = pick("pad_token", None)
        assert bos is not None and eos is not None
        return cls(tokenizer, bos_token=bos, eos_token=eos, pad_token=pad)

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (len(tokenizer) in transformers)."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids without BOS/EOS (the official text_encode)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return str(self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        token_id = self._tokenizer.token_to_id(token)
        return None if token_id is None else int(token_id)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(int(token_id))


class StreamingDetokenizer:
    """Turns generated ids into text deltas as they arrive, on the library's `tokenizers.decoders.DecodeStream`.

    The stream decodes a short window (the ids of the last delta, as context, and the ids not yet emitted) and
    emits a delta only once the window's text does not end in U+FFFD, i.e. no UTF-8 character is cut in half; the
    cost per token does not grow with the output length. `flush` (once, at the end) decodes all ids and emits what
    is still held back (an incomplete character as U+FFFD), so the deltas add up to `Tokenizer.decode` of all ids.

    It replaced a hand-written window of the same design after giving byte-identical deltas, boundaries included,
    on every generated sequence in the fixtures, the tokenizer goldens and thousands of random id sequences
    (split multi-byte characters, special and added tokens, ids past the tokenizer's vocabulary), with and without
    `skip_special_tokens` (tests/test_tokenizer.py keeps that comparison).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.token_ids: list[int] = []  # everything seen, for callers that want it
        self.text = ""  # everything emitted so far

    def add(self, token_id: int) -> str:
        """Feeds one id; returns the newly completed text (possibly "")."""
        self.token_ids.append(int(token_id))
        try:
            delta = self._stream.step(self._tokenizer._tokenizer, int(token_id)) or ""
        except Exception:  # the window's text no longer starts with what was emitted (never seen with this
            return ""  # tokenizer): hold the id back, as the hand-written detokenizer did; `flush` emits the rest
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emits whatever is pending, even an incomplete character (as U+FFFD, like the one-shot decode)."""
        full = self._tokenizer.decode(self.token_ids, skip_special_tokens=self._skip_special_tokens)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
        self.text += delta
        return delta
