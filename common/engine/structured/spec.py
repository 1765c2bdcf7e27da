"""`JsonSpec`: what the output must be, validated (a byte vocabulary) and probed (first mask, forced prefix,
each pattern) before any model work."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import llguidance as llg
import llguidance.numpy as llg_numpy
import numpy as np

from common.engine.structured.masks import allocate_masks
from common.engine.structured.shape import MAX_SCHEMA_CHARS, MAX_SCHEMA_DEPTH, schema_shape
from common.engine.structured.threads import grammar_limits, on_grammar_thread
from common.errors import InputError
from common.files import read_capped_text

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
    where: str = field(default="schema", repr=False, compare=False)  # the field it came from, for compile errors

    @property
    def schema(self) -> dict[str, Any]:
        return json.loads(self.schema_text)


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.replace("<non-verbose/>", "").splitlines() if part.strip())


def is_panic(exc: BaseException) -> bool:
    """A Rust panic inside llguidance: pyo3 raises it as `PanicException`, a BaseException (not Exception)."""
    return type(exc).__name__ == "PanicException"


def panic_message(exc: BaseException) -> str:
    return f"the grammar engine failed ({one_line(str(exc))[:200]})"


def _validated_grammar(schema: Mapping[str, Any], patterns: Sequence[str], where: str) -> str:
    """llguidance's grammar for a schema, its own checks, then the probes with a byte vocabulary (on a grammar
    thread)."""
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(dict(schema), overrides=_JSON_OVERRIDES)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, None, limits=grammar_limits())
    except Exception as exc:  # its refusals are ValueErrors; whatever else it raises is the schema's fault too
        raise InputError(f"{where}: invalid JSON schema: {one_line(str(exc)) or type(exc).__name__}",
                         param=where) from None
    except BaseException as exc:  # a schema can make the engine panic (one did while formatting its error)
        if not is_panic(exc):
            raise
        raise InputError(f"{where}: invalid JSON schema: {panic_message(exc)}", param=where) from None
    if is_error:
        raise InputError(
            f"{where}: invalid JSON schema: {one_line(messages[0] if messages else 'rejected')}", param=where
        )
    probed_matcher(_byte_tokenizer(), _ByteVocabulary.eos_token_id, len(_ByteVocabulary.tokens), grammar, patterns,
                   where, pattern_steps=32)
    return grammar


def grammar_for(schema: Mapping[str, Any], where: str) -> str:
    """llguidance grammar text for a schema, checked without a model: its shape first (`schema_shape`), then
    llguidance's checks and the probes with a byte vocabulary, on a grammar thread."""
    patterns = schema_shape(schema, where).patterns
    return on_grammar_thread(_validated_grammar, schema, patterns, where)


def json_schema_spec(
    schema: Any, *, name: str = DEFAULT_SCHEMA_NAME, strict: bool = True, where: str = "schema"
) -> JsonSpec:
    """A validated spec for a JSON schema given as a dict (or JSON text, as a CLI reads it from a file)."""
    if isinstance(schema, str | bytes):
        try:
            schema = json.loads(schema)
        except RecursionError:
            raise InputError(f"{where}: the schema nests more than {MAX_SCHEMA_DEPTH} levels deep; the limit is "
                             f"{MAX_SCHEMA_DEPTH}", param=where) from None
        except ValueError as exc:
            raise InputError(f"{where}: not valid JSON ({exc})", param=where) from None
    if not isinstance(schema, Mapping):
        raise InputError(f"{where}: a JSON schema must be a JSON object, got {type(schema).__name__}", param=where)
    patterns = schema_shape(schema, where).patterns  # before serializing: json.dumps recurses
    try:
        schema_text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: not serializable as JSON ({exc})", param=where) from None
    if len(schema_text) > MAX_SCHEMA_CHARS:
        raise InputError(
            f"{where}: the schema is {len(schema_text)} characters; the limit is {MAX_SCHEMA_CHARS}", param=where
        )
    grammar = on_grammar_thread(_validated_grammar, schema, patterns, where)
    return JsonSpec("json_schema", schema_text, name, strict, grammar, where)


def json_schema_file_spec(path: Path) -> JsonSpec:
    """A spec from a JSON schema file (the CLI's --json-schema), read with a cap; errors name the file."""
    limit = 4 * MAX_SCHEMA_CHARS  # bytes: generous for indentation and multi-byte text
    text = read_capped_text(path, limit, param="json_schema", kind="a JSON schema")
    return json_schema_spec(text, where=str(path))


@functools.cache
def _json_object_grammar() -> str:
    return grammar_for(JSON_OBJECT_SCHEMA, "json_object")


def json_object_spec() -> JsonSpec:
    """Any JSON object (OpenAI `{"type": "json_object"}`)."""
    text = json.dumps(JSON_OBJECT_SCHEMA, separators=(",", ":"))
    return JsonSpec("json_object", text, "json_object", True, _json_object_grammar(), "response_format")


# ------------------------------------------------------------------------------------------------ probing
# llguidance finds most of a grammar's cost and some of its errors only when masks are computed: a schema that no
# JSON value matches compiles, and a costly pattern builds its lexer states at the first mask that enters it. So a
# grammar is probed before it is accepted: its first mask, its forced prefix and the mask after it, and each regex
# pattern alone for a few steps (the highest allowed id each time: a long step into the pattern). Validation probes
# with a byte-level vocabulary (no model needed: the CLI refuses before loading one; 32 steps, a byte each),
# compilation again with the model's (3 steps: its multi-byte tokens reach further into a pattern at each step).


def _unsatisfiable(where: str) -> InputError:
    return InputError(f"{where}: invalid JSON schema: no JSON value can match it (for example, it only refers to "
                      "itself)", param=where)


def _too_costly(where: str, error: str, pattern: str | None = None) -> InputError:
    if pattern is None:
        return InputError(f"{where}: the JSON schema is too costly to enforce ({error}); simplify it", param=where)
    return InputError(f"{where}: the pattern {pattern[:80]!r} is too costly to enforce ({error}); simplify it "
                      "(smaller or fewer nested repetition counts)", param=where)


def _highest_allowed(row: np.ndarray, except_id: int) -> int | None:
    """The highest id a mask row allows other than `except_id` (EOS); None when there is none."""
    words = np.ascontiguousarray(row, dtype=np.int32).view(np.uint32).copy()
    if 0 <= except_id < words.size * 32:
        words[except_id >> 5] &= np.uint32(~(1 << (except_id & 31)) & 0xFFFFFFFF)
    nonzero = np.flatnonzero(words)
    if not nonzero.size:
        return None
    word = int(nonzero[-1])
    return word * 32 + int(words[word]).bit_length() - 1


class _ByteVocabulary:
    """A vocabulary of the 256 bytes and EOS (id 256), in the shape llguidance's TokenizerWrapper reads."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b"</s>"]
    special_token_ids = [256]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)


@functools.cache
def _byte_tokenizer() -> llg.LLTokenizer:
    return llg.LLTokenizer(llg.TokenizerWrapper(_ByteVocabulary()))


def _check_probe(matcher: llg.LLMatcher, row: np.ndarray, eos_id: int, where: str) -> None:
    if matcher.is_error():
        error = one_line(matcher.get_error())
        if "NoExtensionBias" in error:  # llguidance's words for "nothing can follow"
            raise _unsatisfiable(where)
        raise _too_costly(where, error)
    if not matcher.is_accepting() and _highest_allowed(row, eos_id) is None:
        raise _unsatisfiable(where)


def _probe_pattern(tokenizer: llg.LLTokenizer, eos_id: int, vocab_size: int, pattern: str, where: str,
                   steps: int = 3) -> None:
    grammar = llg.LLMatcher.grammar_from_json_schema({"type": "string", "pattern": pattern}, overrides=_JSON_OVERRIDES)
    matcher = llg.LLMatcher(tokenizer, grammar, log_level=0, limits=grammar_limits())
    if matcher.is_error():
        return  # not a pattern llguidance takes alone (a "pattern" that is no keyword there): checked in place
    masks = allocate_masks(1, vocab_size)
    token: int | None = None
    for step in range(2 * steps + 1):
        if step % 2 == 0:
            llg_numpy.fill_next_token_bitmask(matcher, masks)
            token = _highest_allowed(masks[0], eos_id)
        elif token is not None:
            matcher.consume_token(token)
        if matcher.is_error():
            error = one_line(matcher.get_error())
            if "NoExtensionBias" in error:
                return  # no string matches it: whether that matters is for the whole schema's probe to say
            raise _too_costly(where, error, pattern)
        if token is None:
            return


def probed_matcher(tokenizer: llg.LLTokenizer, eos_id: int, vocab_size: int, grammar: str,
                   patterns: Sequence[str], where: str, pattern_steps: int = 3) -> llg.LLMatcher:
    """A matcher of `grammar` whose first mask is computed, after the probes (see above) found no problem;
    InputError naming `where` otherwise: llguidance refuses the grammar, no JSON value matches it, or it is too
    costly to enforce within GRAMMAR_LIMITS. A panic or any other error of llguidance is an InputError too."""
    try:
        matcher = llg.LLMatcher(tokenizer, grammar, log_level=0, limits=grammar_limits())
        if matcher.is_error():
            raise InputError(f"{where}: invalid JSON schema: {one_line(matcher.get_error())}", param=where)
        masks = allocate_masks(1, vocab_size)
        llg_numpy.fill_next_token_bitmask(matcher, masks)
        _check_probe(matcher, masks[0], eos_id, where)
        walker = matcher.deep_copy()
        forced = walker.compute_ff_tokens()
        if walker.is_error():
            _check_probe(walker, masks[0], eos_id, where)
        if forced:
            walker.consume_tokens(forced)
            llg_numpy.fill_next_token_bitmask(walker, masks)
            _check_probe(walker, masks[0], eos_id, where)
        for pattern in patterns:
            _probe_pattern(tokenizer, eos_id, vocab_size, pattern, where, pattern_steps)
    except InputError:
        raise
    except Exception as exc:  # whatever llguidance raises here is the schema's doing
        raise InputError(f"{where}: invalid JSON schema: {one_line(str(exc)) or type(exc).__name__}",
                         param=where) from None
    except BaseException as exc:
        if not is_panic(exc):
            raise
        raise InputError(f"{where}: invalid JSON schema: {panic_message(exc)}", param=where) from None
    return matcher



