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

from common.errors import ModelNotFoundError

IMAGE_TOKEN = "<image>"
_REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decode yields for an incomplete UTF-8 sequence


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
    """Turns generated ids into text deltas as they arrive.

    Keeps a short window of ids: the last emitted id (decoded together with the new ids so context-dependent
    decoding stays right) and the pending ids whose text is still incomplete. A delta is emitted only once the
    window's decode does not end in U+FFFD, i.e. no UTF-8 character is cut in half. Each `add` decodes only
    the window (a handful of ids), so the cost per token does not grow with the output length.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The window: the last emitted id (decoding context) followed by the ids not yet emitted.
        self._ids: list[int] = []
        self._prefix_text = ""  # decode of the emitted part of the window
        self.token_ids: list[int] = []  # everything seen, for callers that want it
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feeds one id; returns the newly completed text (possibly "")."""
        self.token_ids.append(int(token_id))
        self._ids.append(int(token_id))
        full = self._decode(self._ids)
        if full.endswith(_REPLACEMENT_CHAR) or len(full) <= len(self._prefix_text):
            return ""  # an incomplete character (or nothing visible yet): wait for more bytes
        if not full.startswith(self._prefix_text):  # decoding is not prefix-stable here: emit nothing wrong
            return ""
        delta = full[len(self._prefix_text) :]
        # Slide the window: the newest emitted id stays as context for the next decode.
        self._ids = self._ids[-1:]
        self._prefix_text = self._decode(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emits whatever is pending, even an incomplete character (as U+FFFD, like the one-shot decode)."""
        full = self._decode(self._ids)
        delta = full[len(self._prefix_text) :] if full.startswith(self._prefix_text) else ""
        self._ids = []
        self._prefix_text = ""
        self.text += delta
        return delta
