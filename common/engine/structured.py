"""Structured output: JSON constrained by a JSON schema (OpenAI `response_format`), on llguidance.

Three layers, all framework-free:

* `JsonSpec`: what the output must be, from the OpenAI request shapes (chat `response_format`, Responses
  `text.format`: msgspec tagged unions, which the server's request types use) or from a schema read by the CLI.
  A bad shape or schema is an `InputError` naming the field and the problem, raised before any model work.
* `GrammarCompiler`: one per model. Holds llguidance's view of the tokenizer (built from `tokenizer.json`,
  with the MODEL's vocab size so ids the tokenizer lacks are never allowed) and the compiled grammars, cached
  by schema text (an LRU), so many sequences share one compilation.
* `GrammarMatcher`: the grammar state of one sequence: writes the allowed-token bitmask for the next token,
  consumes the sampled token, says whether EOS is allowed and whether the JSON is complete.

Bitmask layout (llguidance's, also used by vLLM and SGLang): int32 rows of width ceil(vocab_size / 32); id `t`
is allowed when bit `t % 32` of word `t // 32` is set.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import cachetools
import llguidance as llg
import llguidance.numpy as llg_numpy
import msgspec
import numpy as np
from msgspec import UNSET, Meta, Struct, UnsetType

from common.errors import ConfigError, InputError, ModelNotFoundError
from common.files import read_capped_text

# A schema is a request field; past this size it is refused before compiling.
MAX_SCHEMA_CHARS = 100_000
# OpenAI's rule for `json_schema.name`.
_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
DEFAULT_SCHEMA_NAME = "response"
# `json_object` asks for any JSON object.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# Applied over the schema's own "x-guidance" options so a request cannot weaken the guarantee: no keyword is
# silently ignored (lenient), oneOf is never loosened to anyOf, and the layout is compact with no free
# whitespace, so a weak model cannot spend its token budget on blank lines.
_JSON_OVERRIDES: dict[str, Any] = {
    "lenient": False,
    "coerce_one_of": False,
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


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


# ---------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class JsonSpec:
    """The output must be JSON matching `schema` (kind "json_schema") or any JSON object ("json_object").

    `schema_text` (the schema serialized with its key order kept: property order is output order) is the
    identity used for caching compiled grammars. `strict` is recorded as sent; every schema is enforced
    fully either way (keywords the engine cannot enforce are refused, never ignored).
    """

    kind: Literal["json_schema", "json_object"]
    schema_text: str
    name: str = DEFAULT_SCHEMA_NAME
    strict: bool = True
    grammar: str = field(default="", repr=False, compare=False)  # llguidance grammar, made at validation

    @property
    def schema(self) -> dict[str, Any]:
        return json.loads(self.schema_text)


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.replace("<non-verbose/>", "").splitlines() if part.strip())


def _is_panic(exc: BaseException) -> bool:
    """A Rust panic inside llguidance: pyo3 raises it as `PanicException`, a BaseException (not Exception)."""
    return type(exc).__name__ == "PanicException"


def _panic_message(exc: BaseException) -> str:
    return f"the grammar engine failed ({_one_line(str(exc))[:200]})"


def _grammar_for(schema: Mapping[str, Any], where: str) -> str:
    """llguidance grammar text for a schema, checked (tokenizer-independent checks) without a model."""
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(dict(schema), overrides=_JSON_OVERRIDES)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
            grammar, None, limits=llg.LLParserLimits(verbose_errors=False)
        )
    except ValueError as exc:
        raise InputError(f"{where}: invalid JSON schema: {_one_line(str(exc))}", param=where) from None
    except BaseException as exc:  # a schema can make the engine panic (one did while formatting its error)
        if not _is_panic(exc):
            raise
        raise InputError(f"{where}: invalid JSON schema: {_panic_message(exc)}", param=where) from None
    if is_error:
        raise InputError(
            f"{where}: invalid JSON schema: {_one_line(messages[0] if messages else 'rejected')}", param=where
        )
    return grammar


def json_schema_spec(
    schema: Any, *, name: str = DEFAULT_SCHEMA_NAME, strict: bool = True, where: str = "schema"
) -> JsonSpec:
    """A validated spec for a JSON schema given as a dict (or JSON text, as a CLI reads it from a file)."""
    if isinstance(schema, str | bytes):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InputError(f"{where}: not valid JSON ({exc})", param=where) from None
    if not isinstance(schema, Mapping):
        raise InputError(f"{where}: a JSON schema must be a JSON object, got {type(schema).__name__}", param=where)
    try:
        schema_text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: not serializable as JSON ({exc})", param=where) from None
    if len(schema_text) > MAX_SCHEMA_CHARS:
        raise InputError(
            f"{where}: the schema is {len(schema_text)} characters; the limit is {MAX_SCHEMA_CHARS}", param=where
        )
    return JsonSpec("json_schema", schema_text, name, strict, _grammar_for(schema, where))


def json_schema_file_spec(path: Path) -> JsonSpec:
    """A spec from a JSON schema file (the CLI's --json-schema), read with a cap; errors name the file."""
    limit = 4 * MAX_SCHEMA_CHARS  # bytes: generous for indentation and multi-byte text
    text = read_capped_text(path, limit, param="json_schema", kind="a JSON schema")
    return json_schema_spec(text, where=str(path))


def json_object_spec() -> JsonSpec:
    """Any JSON object (OpenAI `{"type": "json_object"}`)."""
    text = json.dumps(JSON_OBJECT_SCHEMA, separators=(",", ":"))
    return JsonSpec("json_object", text, "json_object", True, _grammar_for(JSON_OBJECT_SCHEMA, "json_object"))


# ------------------------------------------------------------------------------------------ request shapes
# The OpenAI shapes, as the official SDK sends them, validated by msgspec (the server decodes request bodies
# into them, so a wrong shape is a 400 naming the field). The JSON schema itself stays a free-form object:
# llguidance checks it (json_schema_spec).


class JsonSchemaFormat(Struct, kw_only=True):
    """Chat `response_format.json_schema`; the Responses API has the same fields inline in `text.format`."""

    name: Annotated[str, Meta(pattern=_NAME_PATTERN)]
    schema: dict[str, Any] | UnsetType = UNSET  # optional in OpenAI's chat API, refused when absent (nothing to match)
    description: str | None = None
    strict: bool | None = None  # null: OpenAI's default, false; every schema is enforced fully either way


class ResponseFormatText(Struct, tag_field="type", tag="text"):
    """Unconstrained text (the default)."""


class ResponseFormatJsonObject(Struct, tag_field="type", tag="json_object"):
    """Any JSON object."""


class ResponseFormatJsonSchema(Struct, tag_field="type", tag="json_schema"):
    """Chat completions: JSON matching `json_schema.schema`."""

    json_schema: JsonSchemaFormat


class TextFormatJsonSchema(JsonSchemaFormat, tag_field="type", tag="json_schema"):
    """Responses API `text.format`: JSON matching `schema` (the fields are inline)."""


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema  # chat `response_format`
TextFormat = ResponseFormatText | ResponseFormatJsonObject | TextFormatJsonSchema  # Responses `text.format`


class TextParam(Struct):
    """Responses API `text` (`{"format": {...}, "verbosity"?}`; fields other than `format` are ignored)."""

    format: TextFormat | None = None


_FORMAT_TYPES = "'text', 'json_object' or 'json_schema'"
# What each field must be, in the words of an error, by the field's name.
_MUST_BE = {
    "type": _FORMAT_TYPES,
    "json_schema": "an object with 'name' and 'schema'",
    "name": "1-64 characters of a-z, A-Z, 0-9, '_' or '-'",
    "schema": "a JSON object (the JSON schema)",
    "strict": "true or false",
    "description": "a string",
    "format": 'an object such as {"type": "json_object"}',
}
_MSGSPEC_ERROR = re.compile(r"(?P<what>.*?)(?: - at `\$(?P<at>.*)`)?", re.DOTALL)


def _typed(value: Any, kind: Any, where: str, must_be: str) -> Any:
    """`value` as `kind` (a Struct from a decoded request is taken as it is; JSON values are validated by msgspec,
    as the server does). An InputError names the field and what it must be, e.g. `response_format.type: ...`."""
    if value is None or isinstance(value, Struct):
        return value
    try:
        return msgspec.convert(value, kind, strict=False)  # strict=False: as Litestar decodes request bodies
    except msgspec.ValidationError as exc:
        match = _MSGSPEC_ERROR.fullmatch(str(exc))
        assert match is not None  # the pattern matches any text
        keys = [key for key in (match["at"] or "").split(".") if key]
        missing = re.fullmatch(r"Object missing required field `(.+)`", match["what"])
        keys += [missing[1]] if missing else []
        param = ".".join([where, *keys])
        hint = _MUST_BE.get(keys[-1]) if keys else must_be
        if hint is None:  # not a field of these shapes: msgspec's own words
            raise InputError(f"{param}: {match['what']}", param=param) from None
        if missing:
            raise InputError(f"{param}: must be {hint}; it is missing", param=param) from None
        found = value
        for key in keys:
            found = found.get(key) if isinstance(found, Mapping) else None
        raise InputError(f"{param}: must be {hint}, got {found!r}", param=param) from None


def _spec_of_format(value: Any, where: str) -> JsonSpec | None:
    if value is None or isinstance(value, ResponseFormatText):
        return None
    if isinstance(value, ResponseFormatJsonObject):
        return json_object_spec()
    options: JsonSchemaFormat = value
    if isinstance(value, ResponseFormatJsonSchema):
        options, where = value.json_schema, f"{where}.json_schema"
    if options.schema is UNSET:
        raise InputError(
            f"{where}.schema: missing; give the JSON schema the output must match", param=f"{where}.schema"
        )
    return json_schema_spec(options.schema, name=options.name, strict=bool(options.strict), where=f"{where}.schema")


def spec_from_response_format(value: ResponseFormat | Any, where: str = "response_format") -> JsonSpec | None:
    """Chat completions `response_format`: None (absent or type "text") means unconstrained output.

    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}` or
    `{"type": "json_object"}`, as a `ResponseFormat` Struct (a decoded request) or as JSON values.
    """
    return _spec_of_format(_typed(value, ResponseFormat, where, _MUST_BE["format"]), where)


def spec_from_text_format(value: TextFormat | Any, where: str = "text.format") -> JsonSpec | None:
    """Responses API `text.format`: the same types with the schema fields inline.

    `{"type": "json_schema", "name", "schema", "strict"?, "description"?}` or `{"type": "json_object"}`.
    """
    return _spec_of_format(_typed(value, TextFormat, where, _MUST_BE["format"]), where)


def spec_from_text_param(value: TextParam | Any, where: str = "text") -> JsonSpec | None:
    """Responses API `text` (`{"format": {...}, "verbosity"?}`): its `format`, as `spec_from_text_format`."""
    param = _typed(value, TextParam, where, 'an object such as {"format": {"type": "json_object"}}')
    return None if param is None else spec_from_text_format(param.format, f"{where}.format")


# ---------------------------------------------------------------------------------------------- matching


class GrammarMatcher:
    """The grammar state of one sequence. Not thread-safe; one per sequence (from `GrammarCompiler.matcher`).

    Per step: `fill_mask(row)` before sampling, `consume(token_id)` after. EOS is in the mask only while the
    JSON is complete (`eos_allowed`). Once `finished`, EOS is the only id allowed; a decode loop may end the
    sequence right there. After a failed `consume` the matcher stays in `error` and allows only EOS. A panic of
    the engine is contained the same way (this sequence fails, the others in its batch go on).
    """

    def __init__(self, matcher: llg.LLMatcher, spec: JsonSpec, vocab_size: int, eos_id: int) -> None:
        self._matcher = matcher
        self.spec = spec
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._eos_consumed = False
        self._failure: str | None = None  # set when the engine panicked

    def fill_mask(self, row: np.ndarray) -> None:
        """Writes the allowed-token bitmask for the next token into `row` (int32, C-contiguous)."""
        rows = row[None, :] if row.ndim == 1 else row  # a view, never a copy: the writes must land in `row`
        _check_mask_rows(rows, self.vocab_size, 1)
        if self._failure is None:
            try:
                llg_numpy.fill_next_token_bitmask(self._matcher, rows)
                return
            except BaseException as exc:
                if not _is_panic(exc):
                    raise
                self._failure = _panic_message(exc)
        rows[0] = 0
        rows[0].view(np.uint32)[self.eos_id >> 5] = np.uint32(1 << (self.eos_id & 31))

    def consume(self, token_id: int) -> bool:
        """Advances over the sampled token; False (and `error` set) when the grammar does not allow it."""
        if self._failure is not None:
            return False
        try:
            accepted = bool(self._matcher.consume_token(int(token_id)))
        except BaseException as exc:
            if not _is_panic(exc):
                raise
            self._failure = _panic_message(exc)
            return False
        if accepted and int(token_id) == self.eos_id:
            self._eos_consumed = True
        return accepted

    def _failed(self) -> bool:
        return self._failure is not None or self._matcher.is_error()

    @property
    def eos_allowed(self) -> bool:
        """True only when the output so far is complete JSON matching the schema."""
        return not self._eos_consumed and not self._failed() and self._matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """The JSON is complete and nothing but EOS can follow (or EOS was consumed)."""
        return not self._failed() and (self._eos_consumed or self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a token outside the grammar was consumed), else None."""
        if self._failure is not None:
            return self._failure
        return _one_line(self._matcher.get_error()) if self._matcher.is_error() else None


def _check_mask_rows(masks: np.ndarray, vocab_size: int, rows: int) -> None:
    width = mask_width(vocab_size)
    if masks.dtype != np.int32 or masks.ndim != 2 or masks.shape[1] != width or masks.shape[0] < rows:
        raise ValueError(
            f"mask must be int32 [{rows}+, {width}] (vocab {vocab_size}), got {masks.dtype} {list(masks.shape)}"
        )
    if not masks.flags["C_CONTIGUOUS"]:
        raise ValueError("mask must be C-contiguous")


class GrammarCompiler:
    """llguidance's tokenizer for one model plus compiled grammars, shared by every sequence (thread-safe).

    `vocab_size` is the model's (`config.language.vocab_size`): masks have that width, and ids past the
    tokenizer's own vocabulary (embedding rows no token uses) are never allowed.
    """

    def __init__(
        self, tokenizer_json: str, *, eos_id: int, vocab_size: int, max_cached: int = 64, threads: int | None = None
    ) -> None:
        try:  # llguidance's end-of-grammar token is the model's EOS, so "stop" in its masks is `eos_id`
            self._tokenizer = llg.LLTokenizer(
                tokenizer_json, n_vocab=vocab_size, eos_token=eos_id, slices=llg.LLTokenizer.json_slices()
            )
        except ValueError as exc:
            raise ConfigError(f"tokenizer.json does not fit the model (vocab_size {vocab_size}): {exc}") from None
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.mask_width = mask_width(vocab_size)
        self._threads = threads
        self._executor: llg.LLExecutor | None = None
        self._compiled: cachetools.LRUCache[str, llg.LLMatcher] = cachetools.LRUCache(maxsize=max_cached)
        self._lock = threading.Lock()

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, *, eos_id: int | None = None, vocab_size: int | None = None, **kwargs: Any
    ) -> GrammarCompiler:
        """From a model directory; `eos_id` / `vocab_size` default to its tokenizer files and config.json."""
        from common.model.config import load_config
        from common.model.tokenizer import Tokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        try:
            tokenizer_json = path.read_text(encoding="utf-8")
        except OSError:
            raise ModelNotFoundError(f"no readable tokenizer.json in {model_dir}") from None
        if eos_id is None:
            eos_id = Tokenizer.from_dir(model_dir).eos_id
        if vocab_size is None:
            vocab_size = load_config(model_dir).language.vocab_size
        return cls(tokenizer_json, eos_id=eos_id, vocab_size=vocab_size, **kwargs)

    # The compiled grammars: an LRU bound to `max_cached` schema texts (cachetools): looked up and stored under the
    # lock, compiled outside it (two threads may compile one schema at once; the first stored is kept). An error is
    # raised, never cached.
    @cachetools.cachedmethod(
        lambda self: self._compiled, key=lambda self, spec: spec.schema_text, lock=lambda self: self._lock
    )
    def _compiled_matcher(self, spec: JsonSpec) -> llg.LLMatcher:
        grammar = spec.grammar or _grammar_for(spec.schema, "schema")
        try:
            compiled = llg.LLMatcher(
                self._tokenizer, grammar, log_level=0, limits=llg.LLParserLimits(verbose_errors=False)
            )
        except BaseException as exc:
            if not _is_panic(exc):
                raise
            raise InputError(f"invalid JSON schema: {_panic_message(exc)}") from None
        if compiled.is_error():
            raise InputError(f"invalid JSON schema: {_one_line(compiled.get_error())}")
        return compiled

    def matcher(self, spec: JsonSpec) -> GrammarMatcher:
        """A fresh matcher for one sequence; the grammar is compiled once per schema text, then copied."""
        return GrammarMatcher(self._compiled_matcher(spec).deep_copy(), spec, self.vocab_size, self.eos_id)

    def cached(self, spec: JsonSpec) -> bool:
        with self._lock:
            return spec.schema_text in self._compiled

    def allocate_masks(self, batch_size: int) -> np.ndarray:
        return allocate_masks(batch_size, self.vocab_size)

    def fill_masks(
        self, matchers: Sequence[GrammarMatcher | None], masks: np.ndarray, *, parallel: bool = False
    ) -> None:
        """Row i of `masks` [>= len(matchers), mask_width] gets matcher i's mask; None rows allow every id.

        Each mask is computed outside the GIL. `parallel` spreads them over llguidance's thread pool, which pays
        only with idle cores to spare (compare both with benchmarks/bench_structured.py).
        """
        _check_mask_rows(masks, self.vocab_size, len(matchers))
        work = [(m._matcher, i) for i, m in enumerate(matchers) if m is not None]
        for i, m in enumerate(matchers):
            if m is None:
                masks[i] = -1
        if parallel and work:
            llg_numpy.fill_next_token_bitmask_par(self._pool(), work, masks)
        else:
            for matcher, i in work:
                llg_numpy.fill_next_token_bitmask(matcher, masks, i)

    def _pool(self) -> llg.LLExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = llg.LLExecutor(self._threads)
            return self._executor
