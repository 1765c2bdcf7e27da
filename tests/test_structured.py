"""Structured output engine (common/structured.py) on the real tokenizer and the model's vocab size.

A fake "model" draws random logits, keeps only what the grammar mask allows and picks greedily or by sampling.
Free choice is gibberish, so output that parses and validates with `jsonschema` proves the constraint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

import jsonschema
import numpy as np
import pytest

from common.engine.structured import (
    DEFAULT_MAX_CACHED,
    GrammarCompiler,
    GrammarMatcher,
    JsonSpec,
    allowed_ids,
    ban_within_grammar,
    bitmask_to_bool,
    json_object_spec,
    json_schema_spec,
    mask_width,
)
from common.errors import ConfigError, InputError, ModelNotFoundError
from common.model.config import load_config
from common.model.tokenizer import Tokenizer
from tests.conftest import MODEL_DIR, fixture_tokenizer
from tests.structured_cases import COMPILER_SCHEMAS as SCHEMAS


@cache
def tokenizer() -> Tokenizer:
    return fixture_tokenizer()


@cache
def model_vocab_size() -> int:
    return load_config(MODEL_DIR).language.vocab_size


@cache
def compiler() -> GrammarCompiler:
    return GrammarCompiler.from_model_dir(MODEL_DIR)


@cache
def json_punctuation_bias() -> np.ndarray:
    """Per-id logit bonus for ids whose text holds a JSON delimiter: a random model that still ends strings.

    Byte-level BPE spells printable ASCII as itself, so the token strings are enough.
    """
    bias = np.zeros(model_vocab_size(), dtype=np.float32)
    for token_id in range(tokenizer().vocab_size):
        token = tokenizer().id_to_token(token_id) or ""
        if any(ch in token for ch in '"}],'):
            bias[token_id] = 6.0
    return bias


@dataclass
class RandomModel:
    """Random logits over the model's vocab; temperature 0 = argmax, else softmax sampling."""

    seed: int
    temperature: float = 0.0
    json_bias: bool = True

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def logits(self) -> np.ndarray:
        noise = self.rng.standard_normal(model_vocab_size()).astype(np.float32) * 2.0
        return noise + json_punctuation_bias() if self.json_bias else noise

    def pick(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max())
        return int(self.rng.choice(len(probs), p=probs / probs.sum()))


def masked(logits: np.ndarray, row: np.ndarray, banned: list[int] | None = None) -> np.ndarray:
    out = np.where(bitmask_to_bool(row, len(logits)), logits, -np.inf)
    if banned:
        out[banned] = -np.inf
    return out


def assert_parses_prefix_rule(matcher: GrammarMatcher, row: np.ndarray, ids: list[int], schema: dict) -> None:
    """EOS is offered exactly when the text so far is complete, valid JSON."""
    eos = compiler().eos_id
    eos_in_mask = bool(bitmask_to_bool(row, model_vocab_size())[eos])
    assert eos_in_mask == matcher.eos_allowed
    if eos_in_mask:
        jsonschema.validate(json.loads(tokenizer().decode(ids)), schema)


def drive(spec: JsonSpec, model: RandomModel, max_tokens: int = 400) -> tuple[str, list[int]]:
    """Generates until EOS under the grammar; returns the text (EOS excluded) and the ids."""
    matcher = compiler().matcher(spec)
    row = np.zeros(compiler().mask_width, dtype=np.int32)
    ids: list[int] = []
    eos = compiler().eos_id
    for _ in range(max_tokens):
        matcher.fill_mask(row)
        allowed = bitmask_to_bool(row, model_vocab_size())
        assert not allowed[tokenizer().vocab_size :].any(), "an id the tokenizer does not have was allowed"
        assert_parses_prefix_rule(matcher, row, ids, spec.schema)
        token = model.pick(masked(model.logits(), row))
        assert matcher.consume(token), matcher.error
        if token == eos:
            assert matcher.finished and matcher.error is None
            return tokenizer().decode(ids), ids
        ids.append(token)
    raise AssertionError(f"no EOS within {max_tokens} tokens: {tokenizer().decode(ids)[:200]!r}")


# ------------------------------------------------------------------------------------------- generation


SLOW_DRIVES = {"array_min_max_items"}  # the longest JSON of all: seconds on 2 cores


@pytest.mark.parametrize(("name", "temperature"), [
    pytest.param(name, temperature, id=f"{name}-{kind}",
                 marks=[pytest.mark.slow] if name in SLOW_DRIVES else [])
    for name in sorted(SCHEMAS) for kind, temperature in (("greedy", 0.0), ("sampled", 1.0))
])
def test_random_model_output_validates(name: str, temperature: float) -> None:
    schema = SCHEMAS[name]
    spec = json_schema_spec(schema, name=name)
    texts = set()
    for seed in range(3):
        text, _ = drive(spec, RandomModel(seed=seed, temperature=temperature))
        jsonschema.validate(json.loads(text), schema)
        texts.add(text)
    assert len(texts) > 1, "different seeds should give different JSON: the model's choice must matter"


@pytest.mark.parametrize("name", ["enums", "string_patterns"])
def test_bounded_schemas_without_json_bias(name: str) -> None:
    # Plain noise (no preference for delimiters): these schemas bound every value's length, so the JSON ends.
    schema = SCHEMAS[name]
    text, _ = drive(json_schema_spec(schema), RandomModel(seed=7, temperature=1.0, json_bias=False))
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("seed", range(4))
def test_json_object_gives_a_json_object(seed: int) -> None:
    text, _ = drive(json_object_spec(), RandomModel(seed=seed, temperature=0.7))
    assert isinstance(json.loads(text), dict)


def test_free_choice_is_not_json() -> None:
    # The control: the same random model without the mask does not write JSON.
    model = RandomModel(seed=0)
    ids = [int(np.argmax(model.logits()[: tokenizer().vocab_size])) for _ in range(30)]
    with pytest.raises(ValueError):
        json.loads(tokenizer().decode(ids))


# ---------------------------------------------------------------------------------------- EOS and errors


def test_eos_only_when_the_json_is_complete() -> None:
    tok, comp = tokenizer(), compiler()
    matcher = comp.matcher(json_schema_spec({"type": "integer", "minimum": 0}))
    row = np.zeros(comp.mask_width, dtype=np.int32)
    matcher.fill_mask(row)
    assert not matcher.eos_allowed and not _allows(row, comp.eos_id)  # nothing written yet
    for token in tok.encode("42"):
        assert matcher.consume(token)
    matcher.fill_mask(row)
    # "42" is complete but could grow ("421"): EOS and digits both allowed, not finished yet.
    assert matcher.eos_allowed and _allows(row, comp.eos_id) and not matcher.finished
    assert _allows(row, tok.encode("7")[0])
    assert matcher.consume(comp.eos_id)
    assert matcher.finished and not matcher.eos_allowed and matcher.error is None


def test_finished_when_only_eos_can_follow() -> None:
    comp = compiler()
    matcher = comp.matcher(json_schema_spec(SCHEMAS["enums"]))
    text = '{"currency": "USD", "status": null, "kind": "receipt"}'
    for token in tokenizer().encode(text):
        assert not matcher.finished
        assert matcher.consume(token), matcher.error
    row = np.zeros(comp.mask_width, dtype=np.int32)
    matcher.fill_mask(row)
    assert matcher.finished and matcher.eos_allowed
    assert allowed_ids(row, comp.vocab_size).tolist() == [comp.eos_id]


def test_eos_before_the_json_is_complete_is_an_error() -> None:
    comp = compiler()
    matcher = comp.matcher(json_schema_spec(SCHEMAS["enums"]))
    for token in tokenizer().encode('{"currency": "EUR"'):
        assert matcher.consume(token)
    assert not matcher.eos_allowed
    assert not matcher.consume(comp.eos_id)
    assert matcher.error and not matcher.finished and not matcher.eos_allowed
    row = np.zeros(comp.mask_width, dtype=np.int32)
    matcher.fill_mask(row)
    assert allowed_ids(row, comp.vocab_size).tolist() == [comp.eos_id]  # an errored sequence can only end


def test_token_outside_the_grammar_is_an_error() -> None:
    matcher = compiler().matcher(json_schema_spec(SCHEMAS["enums"]))
    assert not matcher.consume(tokenizer().encode("hello")[0])
    assert matcher.error is not None and "\n" not in matcher.error
    assert not matcher.consume(tokenizer().vocab_size + 5)  # an id past the tokenizer: never allowed


def _allows(row: np.ndarray, token_id: int) -> bool:
    return bool(bitmask_to_bool(row, model_vocab_size())[token_id])


# ---------------------------------------------------------------------------------------- vocab and masks


def test_mask_width_follows_the_model_config() -> None:
    comp = compiler()
    assert comp.vocab_size == model_vocab_size() == load_config(MODEL_DIR).language.vocab_size
    assert comp.mask_width == mask_width(model_vocab_size()) == -(-model_vocab_size() // 32)
    assert comp.eos_id == tokenizer().eos_id
    assert tokenizer().vocab_size < comp.vocab_size  # padding rows in the embedding exist


def test_inside_a_string_ids_past_the_tokenizer_and_special_tokens_are_refused() -> None:
    comp, tok = compiler(), tokenizer()
    matcher = comp.matcher(json_schema_spec({"type": "string"}))
    assert matcher.consume(tok.encode('"')[0])
    row = np.zeros(comp.mask_width, dtype=np.int32)
    matcher.fill_mask(row)
    allowed = bitmask_to_bool(row, comp.vocab_size)
    assert allowed.sum() > 100_000  # inside a string nearly every text token fits
    assert not allowed[tok.vocab_size :].any()
    for special in (tok.eos_id, tok.bos_id, tok.pad_id, tok.image_token_id):
        assert not allowed[special]


def test_wrong_mask_shape_is_refused() -> None:
    matcher = compiler().matcher(json_object_spec())
    with pytest.raises(ValueError, match="int32"):
        matcher.fill_mask(np.zeros(compiler().mask_width, dtype=np.int64))
    with pytest.raises(ValueError, match="int32"):
        matcher.fill_mask(np.zeros(compiler().mask_width - 1, dtype=np.int32))
    with pytest.raises(ValueError, match="int32"):
        compiler().fill_masks([matcher, None], compiler().allocate_masks(1))
    strided = np.zeros(2 * compiler().mask_width, dtype=np.int32)[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        matcher.fill_mask(strided)  # writing into a copy would lose the mask


@pytest.mark.parametrize("parallel", [False, True], ids=["one-by-one", "thread-pool"])
@pytest.mark.parametrize("sizes", [(1, 0), (3, 1), (5, 2), (0, 2)], ids=["one", "three+1", "five+2", "none+2"])
def test_batch_fill_equals_single_fills(sizes: tuple[int, int], parallel: bool) -> None:
    comp, tok = compiler(), tokenizer()
    constrained, unconstrained = sizes
    prefixes = ['{"currency": "', '{"', "", '{"currency": "JPY", "status": ', '{"currency": "EUR", "status": tr']
    matchers: list[GrammarMatcher | None] = []
    for prefix in prefixes[:constrained]:
        matcher = comp.matcher(json_schema_spec(SCHEMAS["enums"]))
        for token in tok.encode(prefix):
            assert matcher.consume(token), (prefix, matcher.error)
        matchers.append(matcher)
    for k in range(unconstrained):
        matchers.insert(2 * k + 1, None)
    masks = np.zeros((len(matchers) + 1, comp.mask_width), dtype=np.int32)  # a spare row stays untouched
    comp.fill_masks(matchers, masks, parallel=parallel)
    for i, matcher in enumerate(matchers):
        if matcher is None:
            assert (masks[i] == -1).all()
            continue
        row = np.zeros(comp.mask_width, dtype=np.int32)
        matcher.fill_mask(row)
        assert np.array_equal(masks[i], row)
        assert allowed_ids(row, comp.vocab_size).size > 0
    assert (masks[-1] == 0).all()


def test_mixed_batch_in_lockstep() -> None:
    # Several schemas decoded together through fill_masks, as a batched decode loop would.
    comp = compiler()
    names = ["enums", "string_patterns", "array_min_max_items", "nested_objects"]
    matchers = [comp.matcher(json_schema_spec(SCHEMAS[n])) for n in names]
    models = [RandomModel(seed=10 + i, temperature=0.0 if i % 2 else 1.0) for i in range(len(names))]
    ids: list[list[int]] = [[] for _ in names]
    done = [False] * len(names)
    masks = comp.allocate_masks(len(names))
    for _ in range(400):
        comp.fill_masks([None if d else m for m, d in zip(matchers, done, strict=True)], masks)
        for i, (matcher, model) in enumerate(zip(matchers, models, strict=True)):
            if done[i]:
                continue
            token = model.pick(masked(model.logits(), masks[i]))
            assert matcher.consume(token), matcher.error
            done[i] = token == comp.eos_id
            if not done[i]:
                ids[i].append(token)
        if all(done):
            break
    assert all(done)
    for name, seq in zip(names, ids, strict=True):
        jsonschema.validate(json.loads(tokenizer().decode(seq)), SCHEMAS[name])


# ------------------------------------------------------------------------------------------------ caching


def test_compiled_grammar_is_shared_and_matchers_are_independent() -> None:
    comp = GrammarCompiler.from_model_dir(MODEL_DIR, max_cached=2)
    spec = json_schema_spec(SCHEMAS["enums"])
    assert not comp.cached(spec)
    first, second = comp.matcher(spec), comp.matcher(json_schema_spec(SCHEMAS["enums"]))
    assert comp.cached(spec)
    for token in tokenizer().encode('{"currency": "USD"'):
        assert first.consume(token)
    row_first, row_second, row_fresh = (np.zeros(comp.mask_width, dtype=np.int32) for _ in range(3))
    first.fill_mask(row_first)
    second.fill_mask(row_second)
    comp.matcher(spec).fill_mask(row_fresh)
    assert np.array_equal(row_second, row_fresh)  # the first matcher's progress did not leak
    assert all(tokenizer().decode([t]).startswith("{") for t in allowed_ids(row_fresh, comp.vocab_size))
    assert all(tokenizer().decode([t]).startswith(",") for t in allowed_ids(row_first, comp.vocab_size))
    # Least recently used schemas leave the cache first.
    comp.matcher(json_schema_spec(SCHEMAS["string_patterns"]))
    comp.matcher(json_object_spec())
    assert not comp.cached(spec) and comp.cached(json_object_spec())


@pytest.mark.slow
def test_compile_errors_are_not_cached_and_the_default_bound_holds() -> None:
    comp = GrammarCompiler.from_model_dir(MODEL_DIR)
    bad = JsonSpec("json_schema", json.dumps({"type": "strange"}))  # never validated: fails when compiled
    for _ in range(2):
        with pytest.raises(InputError, match="invalid JSON schema"):
            comp.matcher(bad)
        assert not comp.cached(bad)
    specs = [json_schema_spec({"type": "string", "maxLength": n}) for n in range(DEFAULT_MAX_CACHED + 1)]
    for spec in specs:
        comp.matcher(spec)
    assert [comp.cached(spec) for spec in specs] == [False] + [True] * DEFAULT_MAX_CACHED


# ------------------------------------------------------------------------------------------ n-gram bans


def _row_allowing(ids: list[int]) -> np.ndarray:
    row = np.zeros(mask_width(model_vocab_size()), dtype=np.int32)
    for token_id in ids:
        row.view(np.uint32)[token_id >> 5] |= np.uint32(1 << (token_id & 31))
    return row


def test_ban_within_grammar_rules() -> None:
    row = _row_allowing([5, 31, 32, 129279])
    assert allowed_ids(row, model_vocab_size()).tolist() == [5, 31, 32, 129279]
    assert ban_within_grammar(row, []) == []
    assert ban_within_grammar(row, [4, 6, 1000]) == []  # bans of masked ids change nothing
    assert ban_within_grammar(row, [31, 4, 129279]) == [31, 129279]
    # The ban would leave nothing: it yields to the grammar.
    assert ban_within_grammar(row, [5, 31, 32, 129279, 7]) == []
    assert ban_within_grammar(_row_allowing([9]), [9]) == []
    assert ban_within_grammar(row, [5, 5, 31, 32]) == [5, 5, 31, 32]  # duplicates do not count twice
    # Many allowed ids in one 32-bit word (sign bit included): counted exactly.
    word = _row_allowing(list(range(64, 96)))
    assert ban_within_grammar(word, list(range(64, 95))) == list(range(64, 95))
    assert ban_within_grammar(word, list(range(64, 96))) == []


def test_ngram_ban_combined_with_the_grammar() -> None:
    # Each step bans the token the model would pick, plus random others: the pick must change unless the
    # ban covers everything the grammar allows, in which case the grammar wins.
    comp = compiler()
    schema = SCHEMAS["required_fields"]
    model = RandomModel(seed=3)
    rng = np.random.default_rng(4)
    matcher = comp.matcher(json_schema_spec(schema))
    row = np.zeros(comp.mask_width, dtype=np.int32)
    ids: list[int] = []
    yielded = changed = 0
    for _ in range(400):
        matcher.fill_mask(row)
        logits = masked(model.logits(), row)
        favourite = int(np.argmax(logits))
        banned = [favourite, *rng.integers(0, comp.vocab_size, 50).tolist()]
        effective = ban_within_grammar(row, banned)
        token = int(np.argmax(masked(logits, row, effective)))
        assert _allows(row, token)
        if effective:
            assert token not in banned
            changed += 1
        else:
            assert token == favourite  # nothing else was allowed
            yielded += 1
        assert matcher.consume(token), matcher.error
        if token == comp.eos_id:
            break
        ids.append(token)
    assert matcher.finished
    jsonschema.validate(json.loads(tokenizer().decode(ids)), schema)
    assert changed > 0 and yielded > 0  # both branches ran (forced keys and delimiters yield)


# ---------------------------------------------------------------------------------------------- compiler


def test_compiler_refuses_a_vocab_smaller_than_the_tokenizer() -> None:
    with pytest.raises(ConfigError, match="vocab_size 1000"):
        GrammarCompiler.from_model_dir(MODEL_DIR, vocab_size=1000)


def test_compiler_needs_a_tokenizer(tmp_path: Any) -> None:
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        GrammarCompiler.from_model_dir(tmp_path)
