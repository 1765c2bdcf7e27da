"""JSON-constrained decoding in the engine core, on the tiny random-weight model (torch CPU, float32).

The model's free output is gibberish, so JSON that parses and validates proves the constraint. Checked here:
every schema alone and all together in one continuous batch (greedy and sampled, both n-gram rules), the
unconstrained sequences of a mixed batch getting the ids they get alone, the n-gram ban combined with the
grammar, EOS only when the JSON is complete, the end without a wasted step, the budget ending the JSON early,
a token outside the grammar failing only its own sequence, and masks filled on a helper thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common.engine.backend import StepControls
from common.engine.constraints import StructuredOutputError
from common.engine.engine import Engine
from common.engine.ngram import NGramGuard
from common.engine.requests import FINISH_LENGTH, FINISH_STOP
from common.engine.sampling import SamplingParams
from common.engine.structured import allowed_ids, bitmask_to_bool, json_object_spec, json_schema_spec
from common.errors import InputError
from common.model.families import resolve_mode
from common.model.inputs import PreparedInputs
from common.model.prompt import extract_fields, task_prompt
from common.model.tokenizer import Tokenizer
from tests.conftest import FIXTURES, MODEL_DIR, one_torch_thread
from tests.fakes import ScriptedBackend, fixture_engine, lent_core
from tests.structured_cases import OPEN_ENDED_INTEGER, SCHEMAS, UNBOUNDED, is_valid, parses, validated

NGRAM_RULES = {"hf20": (20, 0), "vllm30x90": (30, 90)}  # (no_repeat_ngram_size, ngram_window)
SAMPLERS = {"greedy": {}, "sampled": {"temperature": 0.8, "top_p": 0.95, "seed": 11}}


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with one_torch_thread():
        loaded = Engine.load(str(MODEL_DIR), backend="torch", device="cpu", dtype="float32", max_batch=32)
        yield loaded
        loaded.close()


@pytest.fixture(scope="module")
def image_prompt(engine: Engine) -> PreparedInputs:
    image = Image.open(FIXTURES / "images" / "doc_text.png").convert("RGB")
    return engine.prepare(task_prompt("extract", fields=extract_fields(SCHEMAS["required_fields"])), [image],
                          resolve_mode("tiny"))


def text_prompt(engine: Engine, text: str) -> PreparedInputs:
    return engine.prepare(text, [], resolve_mode("tiny"))


def params(schema: dict[str, Any] | None, *, max_new: int = 160, ngram: str = "hf20", sampler: str = "greedy",
           **kwargs: Any) -> SamplingParams:
    n, window = NGRAM_RULES[ngram]
    spec = json_schema_spec(schema) if schema is not None else None
    return SamplingParams(max_new_tokens=max_new, no_repeat_ngram_size=n, ngram_window=window, json_spec=spec,
                          **SAMPLERS[sampler], **kwargs)


class Recording:
    """The engine's backend, recording every StepControls and counting forward passes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.controls: list[StepControls] = []
        self.forwards = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, batch: int, tokens: Any) -> Any:
        self.forwards += 1
        return self.inner.forward(batch, tokens)

    def sample(self, logits: Any, controls: StepControls) -> Any:
        self.controls.append(controls)
        return self.inner.sample(logits, controls)


def backend_of(engine: Engine) -> Any:
    assert engine.core is not None and engine.core.backend is not None
    return engine.core.backend


def core_on(engine: Engine, backend: Any = None, **kwargs: Any) -> Any:
    """A second engine core on the engine's backend (idle meanwhile), with the engine's grammar."""
    kwargs.setdefault("constraints", engine.constraint_for)
    return lent_core(backend or backend_of(engine), engine.tokenizer, **kwargs)


def recording_core(engine: Engine, **kwargs: Any) -> tuple[Any, Recording]:
    backend = Recording(backend_of(engine))
    return core_on(engine, backend, **kwargs), backend


# ------------------------------------------------------------------------------------------- every schema


@pytest.mark.slow
def test_every_schema_greedy_and_sampled_both_ngram_rules_in_one_batch(
    engine: Engine, image_prompt: PreparedInputs
) -> None:
    jobs = []
    for name, schema in SCHEMAS.items():
        for sampler in SAMPLERS:
            for ngram in NGRAM_RULES:
                generation = engine.submit(image_prompt, params(schema, ngram=ngram, sampler=sampler))
                jobs.append((name, sampler, ngram, generation))
    texts: dict[tuple[str, str], set[str]] = {}
    for name, sampler, ngram, generation in jobs:
        deltas = list(generation)
        result = generation.result
        assert result is not None
        assert result.finish_reason == FINISH_STOP, (name, sampler, ngram, result.text)
        validated(result.text, SCHEMAS[name])
        assert "".join(deltas) == result.text  # the JSON as generated, streamed whole
        assert result.text == engine.tokenizer.decode(result.token_ids)
        assert engine.tokenizer.eos_id not in result.token_ids  # complete JSON ends the sequence by itself
        texts.setdefault((name, sampler), set()).add(result.text)
    assert max(engine.core.batch_sizes) >= 8  # they decoded together
    # Sampling matters: for some schema the sampled JSON differs from the greedy one.
    assert any(texts[(name, "greedy")] != texts[(name, "sampled")] for name in SCHEMAS)


def test_json_object(engine: Engine, image_prompt: PreparedInputs) -> None:
    # Any JSON object: the random model writes an unbounded string key, so a small budget may end it early.
    for seed in (3, 4, 5):
        p = SamplingParams(max_new_tokens=40, temperature=0.7, seed=seed, json_spec=json_object_spec())
        result = engine.generate(image_prompt, p)
        assert result.text.startswith("{")
        if result.finish_reason == FINISH_STOP:
            assert isinstance(validated(result.text, {"type": "object"}), dict)
        else:
            assert result.finish_reason == FINISH_LENGTH and result.completion_tokens == 40


# ------------------------------------------------------------------------------------ mixed batches


@pytest.mark.slow
def test_mixed_batch_gives_every_sequence_the_ids_it_gets_alone(engine: Engine, image_prompt: PreparedInputs) -> None:
    hello = text_prompt(engine, "Write a short story about a lighthouse.")
    jobs: list[tuple[PreparedInputs, SamplingParams]] = [
        (image_prompt, params(None, max_new=24)),
        (hello, params(None, max_new=30, sampler="sampled")),
        (image_prompt, params(SCHEMAS["enums"], sampler="sampled")),
        (hello, params(None, max_new=20, ngram="vllm30x90")),
        (image_prompt, params(SCHEMAS["array_min_max_items"])),
        (hello, params(SCHEMAS["string_patterns"], ngram="vllm30x90")),
        (image_prompt, params(None, max_new=28, sampler="sampled", ngram="vllm30x90", top_k=50)),
    ]
    alone = [engine.submit(prepared, p).run().token_ids for prepared, p in jobs]
    core = core_on(engine)
    with core.paused():
        together = [core.submit(prepared, p) for prepared, p in jobs]
    for (_, p), ids, generation in zip(jobs, alone, together, strict=True):
        assert generation.run().token_ids == ids, p
    assert max(core.batch_sizes) == len(jobs)
    core.close()
    unconstrained = [ids for (_, p), ids in zip(jobs, alone, strict=True) if p.json_spec is None]
    assert not any(parses(engine.tokenizer.decode(ids)) for ids in unconstrained)  # free output: no JSON


def test_unconstrained_batch_sends_no_mask(engine: Engine, image_prompt: PreparedInputs) -> None:
    core, recording = recording_core(engine)
    core.submit(image_prompt, params(None, max_new=6)).run()
    assert recording.controls and all(c.allowed is None for c in recording.controls)
    with core.paused():
        both = [core.submit(image_prompt, params(None, max_new=30)),
                core.submit(image_prompt, params(SCHEMAS["enums"]))]
    for handle in both:
        handle.run()
    core.close()
    mixed = [c for c in recording.controls if c.allowed is not None and c.batch == 2]
    assert mixed, "the two sequences never shared a step"
    assert all((c.allowed[0] == -1).all() for c in mixed)  # the unconstrained lane allows every id
    assert all((c.allowed[1] != -1).any() for c in mixed)


@pytest.mark.slow
def test_masks_on_a_helper_thread_give_the_same_ids(engine: Engine, image_prompt: PreparedInputs) -> None:
    hello = text_prompt(engine, "Describe the weather.")
    jobs = [(image_prompt, params(SCHEMAS[name], sampler=sampler)) for name, sampler in
            (("nested_objects", "greedy"), ("numbers_with_bounds", "sampled"), ("required_fields", "sampled"))]
    jobs.append((hello, params(None, max_new=20)))
    runs = []
    for threaded in (False, True):
        core = core_on(engine, mask_thread=threaded)
        with core.paused():
            generations = [core.submit(prepared, p) for prepared, p in jobs]
        runs.append([g.run().token_ids for g in generations])
        core.close()
    assert runs[0] == runs[1]


# ------------------------------------------------------------------------------------ rules per step


def replayed_bans(prompt: PreparedInputs, p: SamplingParams, ids: list[int]) -> list[list[int]]:
    """What the n-gram guard bans before each generated token (the guard replayed over the output)."""
    guard = NGramGuard(p.no_repeat_ngram_size, p.ngram_window, p.ngram_whitelist)
    guard.reset(prompt.input_ids.tolist())
    bans = []
    for token in ids:
        bans.append(guard.banned())
        guard.push(token)
    return bans


@pytest.mark.parametrize(("sampler", "ngram"), [
    pytest.param("greedy", (2, 0), id="greedy-hf-n2"),
    pytest.param("greedy", (3, 30), id="greedy-windowed-n3-w30", marks=pytest.mark.slow),
    pytest.param("sampled", (2, 0), id="sampled-hf-n2", marks=pytest.mark.slow),
    pytest.param("sampled", (3, 30), id="sampled-windowed-n3-w30", marks=pytest.mark.slow),
])
def test_ngram_ban_combines_with_the_grammar(
    engine: Engine, image_prompt: PreparedInputs, sampler: str, ngram: tuple[int, int]
) -> None:
    # Tiny n-grams make the ban bite often: the random model repeats an array item, and the grammar forces
    # repeated keys and delimiters (`{"item": "`, `", "`).
    n, window = ngram
    name = "array_min_max_items"
    p = SamplingParams(max_new_tokens=160, no_repeat_ngram_size=n, ngram_window=window,
                       json_spec=json_schema_spec(SCHEMAS[name]), **SAMPLERS[sampler])
    core, recording = recording_core(engine)
    result = core.submit(image_prompt, p).run()
    core.close()
    assert result.finish_reason == FINISH_STOP
    validated(result.text, SCHEMAS[name])
    free = engine.submit(image_prompt, replace(p, no_repeat_ngram_size=0, ngram_window=0)).run()
    assert result.token_ids != free.token_ids  # the ban changed the output
    applied = yielded = 0
    for controls, token, banned in zip(recording.controls, result.token_ids, replayed_bans(image_prompt, p,
                                                                                      result.token_ids), strict=True):
        assert controls.allowed is not None
        allowed = set(allowed_ids(controls.allowed[0], engine.config.language.vocab_size).tolist())
        sent = set(controls.ban_ids.tolist())
        assert token in allowed and token not in sent  # both rules held for the chosen token
        assert sent <= allowed and sent <= set(banned)  # only bans the grammar allows are sent
        if allowed <= set(banned):  # the ban would leave nothing: it yields to the grammar
            assert not sent
            yielded += 1
        else:
            assert sent == allowed & set(banned)
            assert token not in banned
            applied += bool(sent)
    assert applied and yielded, (applied, yielded)


def test_eos_allowed_exactly_when_the_json_is_complete(engine: Engine, image_prompt: PreparedInputs) -> None:
    eos = engine.tokenizer.eos_id
    for schema, seed in ((OPEN_ENDED_INTEGER, 1), (OPEN_ENDED_INTEGER, 2), (SCHEMAS["enums"], 3)):
        core, recording = recording_core(engine)
        p = SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed, json_spec=json_schema_spec(schema))
        result = core.submit(image_prompt, p).run()
        core.close()
        assert result.finish_reason == FINISH_STOP
        validated(result.text, schema)
        eos_seen = 0
        for step, controls in enumerate(recording.controls):
            assert controls.allowed is not None
            so_far = engine.tokenizer.decode(result.token_ids[:step])
            eos_allowed = bool(bitmask_to_bool(controls.allowed[0], engine.config.language.vocab_size)[eos])
            complete = is_valid(so_far, schema)
            assert eos_allowed == complete, (step, so_far)
            eos_seen += eos_allowed
        if schema is OPEN_ENDED_INTEGER:
            assert eos_seen  # a number can end or grow: EOS is offered while it could still grow


def test_complete_json_ends_without_a_wasted_step(engine: Engine, image_prompt: PreparedInputs) -> None:
    core, recording = recording_core(engine)
    result = core.submit(image_prompt, params(SCHEMAS["nested_objects"])).run()
    core.close()
    assert result.finish_reason == FINISH_STOP and result.text.endswith("}}}")
    assert result.token_ids[-1] != engine.tokenizer.eos_id
    # The first token comes from the prompt; every later one from one decode step; none after the last.
    assert recording.forwards == result.completion_tokens - 1
    assert len(recording.controls) == result.completion_tokens


def test_budget_ends_the_json_early_with_length(engine: Engine, image_prompt: PreparedInputs) -> None:
    full = engine.submit(image_prompt, params(SCHEMAS["array_min_max_items"])).run()
    cut = engine.submit(image_prompt, params(SCHEMAS["array_min_max_items"], max_new=9)).run()
    assert cut.finish_reason == FINISH_LENGTH and cut.completion_tokens == 9
    assert cut.token_ids == full.token_ids[:9] and full.completion_tokens > 9
    assert full.text.startswith(cut.text) and not parses(cut.text)  # the README says so: need not parse
    endless = engine.submit(image_prompt, params(UNBOUNDED, max_new=30)).run()
    assert endless.finish_reason == FINISH_LENGTH and endless.text.startswith('{"text": "')


# --------------------------------------------------------------------------- scripted (masks ignored)


def scripted_engine(tokenizer: Tokenizer, script: Any) -> Engine:
    return fixture_engine(ScriptedBackend(script, tokenizer.eos_id))


def prompt_ids(tokenizer: Tokenizer, text: str) -> PreparedInputs:
    ids = np.array([tokenizer.bos_id, *tokenizer.encode(text)], dtype=np.int64)
    return PreparedInputs(ids, np.zeros_like(ids, dtype=bool), [])


def test_scripted_json_stops_at_its_last_token(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    document = '{"currency": "USD", "status": true, "kind": "invoice"}'
    fake = scripted_engine(tokenizer, tokenizer.encode(document + " and then some more text"))
    spec = json_schema_spec(SCHEMAS["enums"])
    result = fake.submit(prompt_ids(tokenizer, "x"), SamplingParams(max_new_tokens=100, json_spec=spec)).run()
    assert (result.text, result.finish_reason) == (document, FINISH_STOP)
    assert result.token_ids == tokenizer.encode(document)
    free = fake.submit(prompt_ids(tokenizer, "x"), SamplingParams(max_new_tokens=100)).run()
    assert free.text == document + " and then some more text"


def test_token_outside_the_grammar_fails_only_its_sequence(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    fake = scripted_engine(tokenizer, lambda inputs: tokenizer.encode('{"currency": "GBP"} and more'))
    spec = json_schema_spec(SCHEMAS["enums"])
    bad = fake.submit(prompt_ids(tokenizer, "a"), SamplingParams(max_new_tokens=50, json_spec=spec))
    good = fake.submit(prompt_ids(tokenizer, "b"), SamplingParams(max_new_tokens=50))
    with pytest.raises(StructuredOutputError, match="left the JSON grammar"):
        bad.run()
    assert good.run().text == '{"currency": "GBP"} and more'


def test_json_spec_needs_a_grammar(engine: Engine, image_prompt: PreparedInputs) -> None:
    core = lent_core(backend_of(engine), engine.tokenizer)  # no constraint factory
    with pytest.raises(InputError, match="structured output"):
        core.submit(image_prompt, params(SCHEMAS["enums"]))
    core.close()


def test_engine_builds_its_grammar_once_and_compiles_ahead(engine: Engine) -> None:
    spec = json_schema_spec({"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]})
    grammar = engine.grammar()
    assert engine.grammar() is grammar and grammar.vocab_size == engine.config.language.vocab_size
    assert not grammar.cached(spec)
    engine.compile_json_spec(spec)
    assert grammar.cached(spec)


# ------------------------------------------------------------------------------------------------ MLX


@pytest.mark.mlx
@pytest.mark.slow
def test_mlx_backend_applies_the_masks_with_the_forward_queued_first(
    engine: Engine, image_prompt: PreparedInputs
) -> None:
    # MLX runs asynchronously: the loop queues the forward pass before it consumes the previous tokens and fills
    # the next masks (the overlap path). Greedy JSON there equals the torch backend's.
    pytest.importorskip("mlx.core")
    from common.engine.backend import load_backend

    mlx_engine = Engine(MODEL_DIR, engine.tokenizer, engine.config).start(  # loaded on its core's thread
        lambda: load_backend("mlx", MODEL_DIR, "cpu", "float32", max_batch=8, kv_cache_gib=1.0))
    try:
        assert backend_of(mlx_engine).asynchronous
        jobs = [params(SCHEMAS[name], sampler=sampler) for name, sampler in
                (("enums", "greedy"), ("string_patterns", "greedy"), ("nested_objects", "sampled"))]
        jobs.append(params(None, max_new=20))
        alone = mlx_engine.submit(image_prompt, jobs[-1]).run().token_ids
        assert mlx_engine.core is not None
        with mlx_engine.core.paused():
            generations = [mlx_engine.submit(image_prompt, p) for p in jobs]
        results = [g.run() for g in generations]
        assert results[-1].token_ids == alone
        for p, result in zip(jobs[:-1], results, strict=False):
            assert result.finish_reason == FINISH_STOP
            validated(result.text, p.json_spec.schema)
        for p, result in zip(jobs[:2], results, strict=False):
            assert result.token_ids == engine.submit(image_prompt, p).run().token_ids
    finally:
        mlx_engine.close()


# ------------------------------------------------------------------------------------------ StepMasks


class FixedConstraint:
    """A constraint allowing exactly one id; counts its mask fills."""

    def __init__(self, token_id: int) -> None:
        self.token_id, self.fills = token_id, 0

    def fill_mask(self, row: np.ndarray) -> None:
        self.fills += 1
        row[:] = 0
        row.view(np.uint32)[self.token_id >> 5] = np.uint32(1 << (self.token_id & 31))

    def consume(self, token_id: int) -> bool:
        return token_id == self.token_id

    finished = False
    error = None


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "helper-thread"])
def test_step_masks_follow_the_final_lane_order(threaded: bool) -> None:
    from common.engine.constraints import StepMasks

    vocab = 1000
    masks = StepMasks(vocab, threaded=threaded)
    a, b, c = FixedConstraint(5), FixedConstraint(999), FixedConstraint(64)

    def allowed(rows: np.ndarray | None) -> list[list[int]]:
        assert rows is not None
        return [allowed_ids(row, vocab).tolist() for row in rows]

    masks.start([a, None, b])
    assert allowed(masks.collect([a, None, b])) == [[5], list(range(vocab)), [999]]  # unchanged order
    masks.start([a, None, b])
    assert allowed(masks.collect([a, None, b, c])) == [[5], list(range(vocab)), [999], [64]]  # c joined
    masks.start([a, b])
    assert allowed(masks.collect([b, a])) == [[999], [5]]  # lanes moved
    assert (a.fills, b.fills, c.fills) == (3, 3, 1)  # each row computed once per step
    masks.start([None, None])
    assert masks.collect([None, None]) is None  # nothing constrained: no mask at all
    masks.start([a])
    assert masks.collect([]) is None  # the batch failed meanwhile
    masks.close()


class PanicException(BaseException):  # noqa: N818 - pyo3's name for a Rust panic, which is how it is recognised
    pass


class PanickingEngine:
    """Stands in for llguidance's matcher: every call panics."""

    def consume_token(self, token_id: int) -> bool:
        raise PanicException("index out of bounds")

    def unsafe_compute_mask_ptr(self, *args: Any, **kwargs: Any) -> None:
        raise PanicException("index out of bounds")


def test_an_engine_panic_fails_only_its_sequence(engine: Engine, image_prompt: PreparedInputs) -> None:
    matcher = engine.constraint_for(json_schema_spec(SCHEMAS["enums"]))
    matcher._matcher = PanickingEngine()  # type: ignore[assignment]
    assert not matcher.consume(5) and "grammar engine failed (index out of bounds)" in (matcher.error or "")
    assert not matcher.finished and not matcher.eos_allowed
    row = np.zeros(engine.grammar().mask_width, dtype=np.int32)
    matcher.fill_mask(row)
    assert allowed_ids(row, engine.config.language.vocab_size).tolist() == [engine.tokenizer.eos_id]  # it can only end

    def constraints(spec: Any) -> Any:
        made = engine.constraint_for(spec)
        if spec.schema == SCHEMAS["enums"]:
            made._matcher = PanickingEngine()
        return made

    core = core_on(engine, constraints=constraints)
    with core.paused():
        bad = core.submit(image_prompt, params(SCHEMAS["enums"]))
        good = core.submit(image_prompt, params(SCHEMAS["string_patterns"]))
    with pytest.raises(StructuredOutputError, match="grammar engine failed"):
        bad.run()
    validated(good.run().text, SCHEMAS["string_patterns"])
    core.close()
