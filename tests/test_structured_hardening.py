"""Hostile structured-output requests and sampling fields (a security review's findings): a chain of `$ref`s that
overflowed the stack inside llguidance (a segfault of the server or the CLI), deep nesting, patterns costly enough
to stall every stream, a schema no JSON value matches (answered with `""`), engine panics, and sampling fields out
of range (one of them overflowed an int32 in sampling and failed the whole batch). Each is a 400 naming the field
(or exit code 2 with one line) before any model work.

Tests that would crash the process on an unfixed build run in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import llguidance as llg
import numpy as np
import pytest

from common.engine import structured
from common.engine.sampling import (
    MAX_NEW_TOKENS_BOUND,
    MAX_NGRAM_SIZE,
    MAX_NGRAM_WINDOW,
    MAX_SEED,
    MAX_TOP_K,
    SamplingParams,
)
from common.engine.structured import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_MAX_CACHED,
    GRAMMAR_LIMITS,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_PATTERNS,
    MAX_SCHEMA_REF_DEPTH,
    MAX_SCHEMA_REFS,
    GrammarCompiler,
    JsonSpec,
    allowed_ids,
    entry_bytes_floor,
    grammar_limits,
    json_schema_spec,
    on_grammar_thread,
    schema_shape,
)
from common.errors import InputError
from common.model.modes import MAX_SIDE, MAX_TILES
from tests.conftest import FIXTURES, MODEL_DIR, ROOT
from tests.helpers import LiveServer, one_error_line
from tests.helpers import run_cli as run
from tests.structured_cases import COMPILER_SCHEMAS, SCHEMAS

IMAGE = FIXTURES / "images" / "doc_text.png"
WHERE = "response_format.json_schema.schema"


def ref_chain(length: int) -> dict[str, Any]:
    """`{"$defs": {"d0": {"$ref": "#/$defs/d1"}, ..., "dN": {"type": "string"}}, "$ref": "#/$defs/d0"}`."""
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(length)}
    defs[f"d{length}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def nested_arrays(depth: int) -> dict[str, Any]:
    """An array of arrays ... of strings: `depth` + 1 levels of nesting."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def nested_through_refs(refs: int, depth: int) -> dict[str, Any]:
    """A chain of `refs` definitions, each `depth` levels of arrays deep before it refers to the next."""
    defs: dict[str, Any] = {}
    for i in range(refs):
        inner: dict[str, Any] = {"$ref": f"#/$defs/d{i + 1}"}
        for _ in range(depth):
            inner = {"type": "array", "items": inner}
        defs[f"d{i}"] = inner
    defs[f"d{refs}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


SELF_REFERENCE = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
# 1,000,000 a's: llguidance's lexer runs out of fuel entering it (it took 1-5 s on the decode thread, then a 500).
HEAVY_PATTERN = "^((a{100}){100}){100}$"
NESTED_COUNTS = "^(([a-z]{1,20}){1,20}){1,20}$"


def heavy_schema(pattern: str = HEAVY_PATTERN) -> dict[str, Any]:
    """The costly pattern behind a free string, so that no forced prefix leads into it."""
    return {"type": "object", "properties": {"x": {"type": "string", "maxLength": 5},
                                             "a": {"type": "string", "pattern": pattern}},
            "required": ["x", "a"], "additionalProperties": False}


# ------------------------------------------------------------------------------------------------ schema shape


SHAPES = [
    (ref_chain(MAX_SCHEMA_REFS + 100), f"has more than {MAX_SCHEMA_REFS} $refs"),
    (ref_chain(300), f"levels deep with its $refs followed (each $ref one level); the limit is {MAX_SCHEMA_REF_DEPTH}"),
    (nested_through_refs(20, 20), "with its $refs followed"),
    (nested_arrays(MAX_SCHEMA_DEPTH), f"nests more than {MAX_SCHEMA_DEPTH} levels deep"),
    (nested_arrays(5000), f"nests more than {MAX_SCHEMA_DEPTH} levels deep"),  # json.dumps would recurse
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"^a{{{i}}}$"}
                                       for i in range(MAX_SCHEMA_PATTERNS + 1)}}, "distinct regex patterns"),
]


@pytest.mark.parametrize(("schema", "problem"), SHAPES, ids=["refs", "ref-chain", "refs-times-depth", "depth",
                                                            "depth-5000", "patterns"])
def test_schema_shape_is_checked_before_llguidance_sees_it(schema: dict[str, Any], problem: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(structured.spec, "_validated_grammar", lambda *args: pytest.fail("llguidance was reached"))
    with pytest.raises(InputError) as info:
        json_schema_spec(schema, where=WHERE)
    message = str(info.value)
    assert message.startswith(f"{WHERE}: ") and problem in message and "\n" not in message
    assert info.value.param == WHERE


def test_real_schemas_are_far_inside_the_bounds() -> None:
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}
    mutual = {"$defs": {"a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}},
                        "b": {"type": "array", "items": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}},
              "type": "object", "properties": {"root": {"$ref": "#/$defs/a"}}}
    for schema in [*SCHEMAS.values(), *COMPILER_SCHEMAS.values(), tree, mutual]:
        shape = schema_shape(schema)
        assert shape.depth <= 12 and shape.ref_depth <= 24 and shape.refs <= 4, schema
        json_schema_spec(schema)
    assert schema_shape(tree).ref_depth == 5  # the root's $ref, then node's 4 levels (its $ref back to node is cut)
    # At the bounds, accepted.
    assert schema_shape(nested_arrays(MAX_SCHEMA_DEPTH - 1)).depth == MAX_SCHEMA_DEPTH
    json_schema_spec(nested_arrays(MAX_SCHEMA_DEPTH - 1))
    assert schema_shape(ref_chain(200)).ref_depth <= MAX_SCHEMA_REF_DEPTH
    json_schema_spec(ref_chain(200))


def test_what_counts_as_a_ref_or_a_pattern() -> None:
    schema = {
        "type": "object",
        "properties": {  # names, not keywords: a property may be called "$ref", "pattern" or "enum"
            "$ref": {"type": "string", "pattern": "^x+$"},
            "pattern": {"type": "string"},
            "enum": {"$ref": "#/$defs/a~1b"},
        },
        "patternProperties": {"^k[0-9]+$": {"type": "integer"}},
        "$defs": {"a/b": {"type": "string", "pattern": "^y$"}},
        "examples": [{"$ref": "#/nowhere", "pattern": "(unclosed"}],  # data, not schemas
        "default": {"$ref": "#/nowhere"},
    }
    shape = schema_shape(schema)
    assert shape.refs == 1 and set(shape.patterns) == {"^x+$", "^k[0-9]+$", "^y$"}
    assert schema_shape({"$ref": "#/%24defs/x", "$defs": {"x": nested_arrays(3)}}).ref_depth == 5  # %-encoded


# ------------------------------------------------------------------------------------------------ grammar threads


CRASHED = """
import json
from common.engine.structured import json_schema_spec
from common.errors import InputError
from tests.test_structured_hardening import ref_chain

try:
    json_schema_spec(ref_chain(2800), where="w")  # on the main thread
except InputError as exc:
    print(json.dumps({"refused": str(exc), "param": exc.param}))
# Without the shape checks, on a grammar thread: its large stack takes what overflowed 8 MiB.
from common.engine.structured import on_grammar_thread
from common.engine.structured.spec import _validated_grammar
print(json.dumps({"grammar": len(on_grammar_thread(_validated_grammar, ref_chain(2800), (), "w"))}))
"""


def test_the_ref_chain_that_crashed_is_refused_and_llguidance_runs_on_a_large_stack() -> None:
    run_ = subprocess.run([sys.executable, "-c", CRASHED], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run_.returncode == 0, (run_.returncode, run_.stderr[-2000:])  # -11 before: a segfault
    refused, grammar = (json.loads(line) for line in run_.stdout.splitlines())
    assert refused == {"refused": f"w: the schema has more than {MAX_SCHEMA_REFS} $refs; the limit is "
                                  f"{MAX_SCHEMA_REFS}", "param": "w"}
    assert grammar["grammar"] > 0


def test_grammar_threads() -> None:
    assert on_grammar_thread(lambda: threading.current_thread().name).startswith("dsocr-grammar-")
    assert threading.stack_size() == 0  # set for those threads only
    assert on_grammar_thread(on_grammar_thread, lambda: 7) == 7  # nested calls run in place (no deadlock)

    class Panic(BaseException):
        pass

    def panics() -> None:
        raise Panic("boom")

    with pytest.raises(Panic):
        on_grammar_thread(panics)
    assert on_grammar_thread(lambda: 8) == 8  # the thread survived


# ------------------------------------------------------------------------------------------------ limits, probes


def test_llguidance_limits_are_set_for_validation_and_matchers() -> None:
    limits = grammar_limits()
    assert {name: getattr(limits, name) for name in GRAMMAR_LIMITS} == GRAMMAR_LIMITS
    assert not limits.verbose_errors
    assert GRAMMAR_LIMITS["max_lexer_states"] < 250_000 and GRAMMAR_LIMITS["initial_lexer_fuel"] < 1_000_000


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler.from_model_dir(MODEL_DIR)


UNSATISFIABLE = [SELF_REFERENCE, {"$ref": "#"}, {"anyOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#"}}}]


@pytest.mark.parametrize("schema", UNSATISFIABLE, ids=["self", "root", "through-anyOf"])
def test_a_schema_no_json_value_matches_is_refused(schema: dict[str, Any], compiler: GrammarCompiler) -> None:
    with pytest.raises(InputError, match=r"^response_format\.json_schema\.schema: invalid JSON schema: no JSON "
                                         r"value can match it") as info:
        json_schema_spec(schema, where=WHERE)
    assert info.value.param == WHERE
    # The compiler refuses it too (a spec made without validation), naming the spec's field.
    unchecked = JsonSpec("json_schema", json.dumps(schema), where="text.format.schema",
                         grammar=llg.LLMatcher.grammar_from_json_schema(schema))
    with pytest.raises(InputError, match=r"^text\.format\.schema: invalid JSON schema: no JSON value") as info:
        compiler.matcher(unchecked)
    assert info.value.param == "text.format.schema" and not compiler.cached(unchecked)


@pytest.mark.parametrize("pattern", [HEAVY_PATTERN, NESTED_COUNTS, "^a{1000000}$"])
def test_costly_patterns_are_refused_up_front(pattern: str, compiler: GrammarCompiler,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match=r"too costly to enforce \(lexer error: too many expressions") as info:
        json_schema_spec(heavy_schema(pattern), where=WHERE)
    assert info.value.param == WHERE and str(info.value).startswith(f"{WHERE}: ")
    # The compilation probes with the model's vocabulary on a grammar thread, where the first mask is computed.
    threads: list[str] = []
    probed = structured.probed_matcher

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return probed(*args, **kwargs)

    monkeypatch.setattr(structured.compiler, "probed_matcher", recording)
    unchecked = JsonSpec("json_schema", json.dumps(heavy_schema(pattern)), where=WHERE,
                         grammar=llg.LLMatcher.grammar_from_json_schema(heavy_schema(pattern)))
    with pytest.raises(InputError, match="too costly to enforce") as info:
        compiler.matcher(unchecked)
    assert info.value.param == WHERE and not compiler.cached(unchecked)
    assert threads and all(name.startswith("dsocr-grammar-") for name in threads)


def test_a_grammar_past_the_parser_limits_is_refused_when_compiled(compiler: GrammarCompiler) -> None:
    """1,500 optional properties: more Earley items in a row than allowed (it failed the first decode step)."""
    schema = {"type": "object", "properties": {f"field{i}": {"type": "integer"} for i in range(1500)}}
    with pytest.raises(InputError, match=r"too costly to enforce \(Parser Error: Current row has \d+ items; max is "
                                         f"{GRAMMAR_LIMITS['max_items_in_row']}"):
        json_schema_spec(schema, where=WHERE)


def test_a_compiled_grammar_has_its_first_mask_ready(compiler: GrammarCompiler) -> None:
    spec = json_schema_spec(SCHEMAS["enums"])
    matcher = compiler.matcher(spec)
    row = compiler.allocate_masks(1)[0]
    matcher.fill_mask(row)
    assert allowed_ids(row, compiler.vocab_size).size > 0 and compiler.cached(spec)


class PanicException(BaseException):  # noqa: N818 - pyo3's name for a Rust panic, which is how it is recognised
    pass


def failing_llguidance(where: str, exc: BaseException) -> types.SimpleNamespace:
    """llguidance with LLMatcher raising `exc` at `where`: "new" (a matcher is made), "validate" or "mask"."""
    real = llg.LLMatcher

    class Matcher:
        grammar_from_json_schema = staticmethod(real.grammar_from_json_schema)

        @staticmethod
        def validate_grammar_with_warnings(*args: Any, **kwargs: Any) -> Any:
            if where == "validate":
                raise exc
            return real.validate_grammar_with_warnings(*args, **kwargs)

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            if where == "new":
                raise exc
            return real(*args, **kwargs)

    fake = types.SimpleNamespace(**{name: getattr(llg, name) for name in dir(llg) if not name.startswith("__")})
    fake.LLMatcher = Matcher
    return fake


def use_llguidance(monkeypatch: pytest.MonkeyPatch, fake: types.SimpleNamespace) -> None:
    """`fake` as llguidance wherever the package calls it (validation and probing, compilation)."""
    for module in (structured.spec, structured.compiler):
        monkeypatch.setattr(module, "llg", fake)


@pytest.mark.parametrize("where", ["validate", "new"])
@pytest.mark.parametrize("exc", [PanicException("index out of bounds"), RuntimeError("unexpected state")],
                         ids=["panic", "error"])
def test_llguidance_panics_and_errors_are_input_errors(where: str, exc: BaseException, compiler: GrammarCompiler,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    use_llguidance(monkeypatch, failing_llguidance(where, exc))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    with pytest.raises(InputError) as info:
        json_schema_spec(schema, where=WHERE)
    message = str(info.value)
    assert message.startswith(f"{WHERE}: invalid JSON schema: ") and info.value.param == WHERE
    assert ("the grammar engine failed (index out of bounds)" if isinstance(exc, PanicException)
            else "unexpected state") in message
    monkeypatch.undo()
    spec = json_schema_spec(schema, where=WHERE)
    use_llguidance(monkeypatch, failing_llguidance("new", exc))
    with pytest.raises(InputError, match=f"^{WHERE}: invalid JSON schema: "):
        compiler.matcher(spec)  # the compilation, on a grammar thread


def test_a_panic_while_probing_a_mask_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def panics(*args: Any, **kwargs: Any) -> None:
        raise PanicException("slice index starts at 9 but ends at 3")

    monkeypatch.setattr(structured.spec.llg_numpy, "fill_next_token_bitmask", panics)
    with pytest.raises(InputError, match="the grammar engine failed \\(slice index starts at 9"):
        json_schema_spec({"type": "object", "properties": {"q": {"type": "boolean"}}}, where=WHERE)


# ------------------------------------------------------------------------------------------------ the cache


def test_the_cache_is_bounded_by_bytes_and_count(compiler: GrammarCompiler, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEFAULT_MAX_CACHED == 32 and DEFAULT_CACHE_BYTES == 512 << 20
    specs = [json_schema_spec({"type": "string", "maxLength": n}) for n in range(6)]
    floor = entry_bytes_floor(specs[0])
    monkeypatch.setattr(structured.compiler, "rss_bytes", lambda: 1)  # no growth measured: each entry is its floor
    comp = GrammarCompiler.from_model_dir(MODEL_DIR, max_cached=4, max_cache_bytes=int(2.5 * floor))
    for spec in specs:
        comp.matcher(spec)
    assert [comp.cached(spec) for spec in specs] == [False] * 4 + [True] * 2  # bytes bound: two fit
    assert comp.cache_bytes == 2 * floor
    # An entry larger than the whole budget is compiled and used, not kept.
    big = json_schema_spec({"type": "object", "description": "x" * 40_000})
    assert entry_bytes_floor(big) > 2.5 * floor
    row = comp.allocate_masks(1)[0]
    comp.matcher(big).fill_mask(row)
    assert allowed_ids(row, comp.vocab_size).size > 0
    assert not comp.cached(big) and comp.cached(specs[-1])
    # The process growth measured while compiling counts when it exceeds the floor.
    readings = iter([1, 1 + 2 * floor])
    monkeypatch.setattr(structured.compiler, "rss_bytes", lambda: next(readings))
    grown = json_schema_spec({"type": "integer", "maximum": 7})
    comp.matcher(grown)
    assert comp.cached(grown) and comp.cache_bytes == 2 * floor  # alone now: it took the whole budget but a bit
    # The count bound (the shared compiler: its default budget, a count of 3 for this test).
    assert compiler.max_cached == DEFAULT_MAX_CACHED
    monkeypatch.setattr(compiler, "max_cached", 3)
    monkeypatch.setattr(structured.compiler, "rss_bytes", lambda: 0)
    for spec in specs:
        compiler.matcher(spec)
    assert [compiler.cached(spec) for spec in specs] == [False] * 3 + [True] * 3


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize(("field", "value"), [
    ("no_repeat_ngram_size", MAX_NGRAM_SIZE + 1), ("ngram_window", MAX_NGRAM_WINDOW + 1), ("top_k", MAX_TOP_K + 1),
    ("seed", MAX_SEED + 1), ("temperature", 101.0), ("max_new_tokens", MAX_NEW_TOKENS_BOUND + 1),
])
def test_sampling_params_bound_every_numeric_field(field: str, value: Any) -> None:
    with pytest.raises(InputError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == {"max_new_tokens": "max_tokens"}.get(field, field)
    # The bounds themselves are accepted.
    SamplingParams(no_repeat_ngram_size=MAX_NGRAM_SIZE, ngram_window=MAX_NGRAM_WINDOW, top_k=MAX_TOP_K,
                   seed=MAX_SEED, temperature=100.0, max_new_tokens=MAX_NEW_TOKENS_BOUND)


# ------------------------------------------------------------------------------------------------ the server

API_OUT_OF_RANGE = [
    ("top_k", MAX_TOP_K + 1), ("top_k", -1), ("seed", MAX_SEED + 1), ("temperature", 2.5), ("top_p", 1.5),
    ("max_tokens", MAX_NEW_TOKENS_BOUND + 1), ("max_completion_tokens", MAX_NEW_TOKENS_BOUND + 1),
    ("no_repeat_ngram_size", MAX_NGRAM_SIZE + 1), ("ngram_window", MAX_NGRAM_WINDOW + 1), ("ngram_window", 2**62),
    ("base_size", MAX_SIDE + 1), ("image_size", 2**40), ("min_crops", MAX_TILES + 1), ("max_crops", 0),
]


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    from server import ServerSettings, create_app
    from tests.fakes import script_engine

    engine = script_engine('{"a": 1}')
    with LiveServer(create_app(engine, ServerSettings(mode="tiny"))) as server:
        server.engine = engine  # type: ignore[attr-defined]
        yield server
    engine.close()


def post(live: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{live.base}/v1/{path}", json=body, timeout=60)


def chat(content: str = "Extract the fields.", **extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-ocr", "messages": [{"role": "user", "content": content}], **extra}


@pytest.mark.server
@pytest.mark.parametrize(("field", "value"), API_OUT_OF_RANGE, ids=[f"{f}={v}" for f, v in API_OUT_OF_RANGE])
def test_sampling_fields_out_of_range_are_refused_as_the_body_is_decoded(live: LiveServer, field: str,
                                                                        value: Any) -> None:
    steps = live.engine.core.steps  # type: ignore[attr-defined]
    response = post(live, "chat/completions", chat(temperature=1, **{field: value}) if field != "temperature"
                    else chat(**{field: value}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert error["message"].startswith("invalid request body: ") and error["message"].endswith(f"(field {field})")
    assert live.engine.core.steps == steps  # type: ignore[attr-defined]


@pytest.mark.server
def test_responses_fields_are_bounded_too_and_the_bounds_are_accepted(live: LiveServer) -> None:
    for field, value in (("max_output_tokens", MAX_NEW_TOKENS_BOUND + 1), ("top_k", MAX_TOP_K + 1),
                         ("no_repeat_ngram_size", MAX_NGRAM_SIZE + 1)):
        response = post(live, "responses", {"input": "hi", field: value})
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    limits = {"temperature": 2.0, "top_p": 1.0, "top_k": MAX_TOP_K, "seed": MAX_SEED, "max_tokens": 16,
              "no_repeat_ngram_size": MAX_NGRAM_SIZE, "ngram_window": MAX_NGRAM_WINDOW}
    response = post(live, "chat/completions", chat(**limits))
    assert response.status_code == 200, response.text
    response = post(live, "responses", {"input": "hi", "max_output_tokens": MAX_NEW_TOKENS_BOUND, "top_k": MAX_TOP_K,
                                        "temperature": 1.0, "seed": 0})
    assert response.status_code == 200, response.text


HOSTILE_SCHEMAS = [
    (ref_chain(600), f"more than {MAX_SCHEMA_REFS} $refs"),
    (ref_chain(300), "with its $refs followed"),
    (nested_arrays(100), f"nests more than {MAX_SCHEMA_DEPTH} levels deep"),
    (SELF_REFERENCE, "invalid JSON schema: no JSON value can match it"),
    (heavy_schema(), f"the pattern {HEAVY_PATTERN!r} is too costly to enforce"),
    (heavy_schema(NESTED_COUNTS), "too costly to enforce"),
]


@pytest.mark.server
@pytest.mark.parametrize(("schema", "problem"), HOSTILE_SCHEMAS,
                         ids=["refs", "ref-chain", "depth", "self-reference", "heavy-pattern", "nested-counts"])
def test_hostile_schemas_are_400s_naming_the_field(live: LiveServer, schema: dict[str, Any], problem: str) -> None:
    steps = live.engine.core.steps  # type: ignore[attr-defined]
    format_ = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    response = post(live, "chat/completions", chat(response_format=format_))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == WHERE and error["message"].startswith(f"{WHERE}: ") and problem in error["message"]
    response = post(live, "responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x",
                                                                           "schema": schema}}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "text.format.schema"
    assert live.engine.core.steps == steps  # type: ignore[attr-defined]


@pytest.mark.server
def test_an_engine_panic_while_checking_a_schema_is_a_400(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    use_llguidance(monkeypatch, failing_llguidance("new", PanicException("index out of bounds")))
    format_ = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "never_seen_before": {"type": "integer"}}}}}
    response = post(live, "chat/completions", chat(response_format=format_))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == WHERE and "the grammar engine failed (index out of bounds)" in error["message"]


CRASHING_SERVER = """
import json, httpx
from server import ServerSettings, create_app
from tests.fakes import script_engine
from tests.helpers import LiveServer
from tests.test_structured_hardening import ref_chain

engine = script_engine('"x"')
with LiveServer(create_app(engine, ServerSettings(mode="tiny"))) as live:
    for length in (2500, 2800):
        schema = ref_chain(length)
        chat = httpx.post(f"{live.base}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        responses = httpx.post(f"{live.base}/v1/responses", timeout=60, json={
            "input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}})
        print(json.dumps([chat.status_code, chat.json()["error"]["param"], responses.status_code,
                          responses.json()["error"]["param"]]), flush=True)
engine.close()
"""


@pytest.mark.server
@pytest.mark.slow
def test_the_ref_chain_that_crashed_the_server_is_a_400() -> None:
    run_ = subprocess.run([sys.executable, "-c", CRASHING_SERVER], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert run_.returncode == 0, (run_.returncode, run_.stderr[-2000:])  # -11 before: the server segfaulted
    answers = [json.loads(line) for line in run_.stdout.splitlines()]
    assert answers == [[400, WHERE, 400, "text.format.schema"]] * 2


# ------------------------------------------------------------------------------------------------ the CLI


def test_the_ref_chain_that_crashed_the_cli_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "chain.schema.json"
    path.write_text(json.dumps(ref_chain(2800)))
    run_ = subprocess.run([sys.executable, "cli.py", str(IMAGE), "--json-schema", str(path), "--model",
                           str(MODEL_DIR)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run_.returncode == 2, (run_.returncode, run_.stderr[-2000:])  # 139 before: a segfault
    assert one_error_line(run_.stderr) == (f"dsocr: error: --json-schema {path}: the schema has more than "
                                           f"{MAX_SCHEMA_REFS} $refs; the limit is {MAX_SCHEMA_REFS}")


class NoModel:
    """Fails the test if the CLI tries to load the model."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the model was used ({name}) although the command line was wrong")


CLI_SCHEMAS = [
    (json.dumps(nested_arrays(100)), f"nests more than {MAX_SCHEMA_DEPTH} levels deep"),
    ('{"items": ' * 5000 + "{}" + "}" * 5000, f"nests more than {MAX_SCHEMA_DEPTH} levels deep"),  # json.loads recursed
    (json.dumps(ref_chain(300)), "with its $refs followed"),
    (json.dumps(SELF_REFERENCE), "invalid JSON schema: no JSON value can match it"),
    (json.dumps(heavy_schema()), "is too costly to enforce"),
    (json.dumps(heavy_schema(NESTED_COUNTS)), "is too costly to enforce"),
]


@pytest.mark.parametrize(("text", "needle"), CLI_SCHEMAS,
                         ids=["depth", "depth-5000", "ref-chain", "self-reference", "heavy-pattern", "nested-counts"])
def test_hostile_schema_files_are_one_line_exit_2(text: str, needle: str, tmp_path: Path, capsys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hostile.schema.json"
    path.write_text(text)
    code, _, err = run([str(IMAGE), "--json-schema", str(path), "--mode", "tiny"], capsys, monkeypatch, NoModel())
    assert code == 2, err
    line = one_error_line(err)
    assert line.startswith(f"dsocr: error: --json-schema {path}: ") and needle in line


CLI_FLAGS = [
    (["--no-repeat-ngram-size", str(MAX_NGRAM_SIZE + 1)], f"--no-repeat-ngram-size must be between 0 and "
                                                          f"{MAX_NGRAM_SIZE}, got {MAX_NGRAM_SIZE + 1}"),
    (["--ngram-window", str(MAX_NGRAM_WINDOW + 1)], f"--ngram-window must be between 0 and {MAX_NGRAM_WINDOW}"),
    (["--top-k", str(MAX_TOP_K + 1)], f"--top-k must be between 0 and {MAX_TOP_K}"),
    (["--seed", str(MAX_SEED + 1)], f"--seed must be between 0 and {MAX_SEED}"),
    (["--max-new-tokens", str(MAX_NEW_TOKENS_BOUND + 1)], f"must be at most {MAX_NEW_TOKENS_BOUND}"),
    (["--temperature", "101"], "--temperature must be between 0 and 100"),
]


@pytest.mark.parametrize(("flags", "needle"), CLI_FLAGS, ids=[f[0] for f, _ in CLI_FLAGS])
def test_sampling_flags_out_of_range_are_one_line_exit_2(flags: list[str], needle: str, capsys,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run([str(IMAGE), *flags, "--mode", "tiny"], capsys, monkeypatch, NoModel())
    assert code == 2, err
    assert needle in one_error_line(err)


def test_bitmask_probe_helper() -> None:
    row = np.zeros(4, dtype=np.int32)
    assert structured.spec._highest_allowed(row, 5) is None
    row.view(np.uint32)[0] = np.uint32(1 << 5)
    assert structured.spec._highest_allowed(row, 5) is None  # EOS alone
    row.view(np.uint32)[3] = np.uint32(1 << 31)
    assert structured.spec._highest_allowed(row, 5) == 127
