"""The DeepSeek-OCR tokenizer (byte-level BPE) on the `tokenizers` library, and a streaming detokenizer.

`encode` is what the official `text_encode` does (`tokenizer.encode(text, add_special_tokens=False)`);
special ids are looked up by the token strings named in tokenizer_config.json / special_tokens_map.json,
never hard-coded.
`clean_up_tokenization_spaces` is false in the official config, so `decode` is the raw library decode.
"""

from __future__ import annotations

import functools
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


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> the byte it stands for (tokenizer.json's ByteLevel pre-tokenizer
    and decoder): printable Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 onwards, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


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
        self._added: dict[int, str] | None = None  # added/special tokens' contents by id, read on first use
        self._bytes: dict[int, bytes] = {}  # token_bytes, memoised
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

    def token_bytes(self, token_id: int) -> bytes:
        """The exact UTF-8 bytes the token stands for (OpenAI's `bytes`; may hold part of a character): a vocabulary
        token's string mapped back through the byte-level alphabet, an added or special token's content as UTF-8,
        b"" for an id past the tokenizer's vocabulary (the model's may be larger). Concatenated over a sequence
        they are the UTF-8 of `decode` of its ids (as the library's ByteLevel decoder, which also takes a token
        holding a character outside the alphabet as its own UTF-8)."""
        token_id = int(token_id)
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._token_bytes(token_id)
        return cached

    def token_text(self, token_id: int) -> str:
        """`token_bytes` decoded with errors="replace" (OpenAI's `token`: U+FFFD for a partial character)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _token_bytes(self, token_id: int) -> bytes:
        if self._added is None:
            self._added = {int(i): t.content for i, t in self._tokenizer.get_added_tokens_decoder().items()}
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            return b""
        table = _byte_level_alphabet()
        if all(char in table for char in token):
            return bytes(table[char] for char in token)
        return token.encode("utf-8")


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
