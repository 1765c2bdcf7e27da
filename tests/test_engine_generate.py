"""Generation through the engine core on every backend: the fixtures' exact token ids for every case all in one
continuous batch, sequences joining and leaving mid-flight, EOS, cancellation, per-sequence seeded sampling and
the n-gram ban, on the tiny DeepSeek-OCR model (float32).

The core's own thread loads each backend (as in production: MLX's streams are thread-local). Per-case parity
alone (ids and raw logits per step, end to end from the image) is in test_model_parity.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from common.engine.backend import load_backend
from common.engine.core import EngineCore
from common.engine.requests import FINISH_CANCELLED, FINISH_STOP
from common.engine.sampling import SamplingParams
from common.model.inputs import PreparedInputs
from tests.conftest import MODEL_DIR, one_torch_thread
from tests.helpers_backend import BACKENDS, FAMILIES, GENERATED, KINDS, tokenizer

V1 = FAMILIES["deepseek-ocr"]
TEXT_ONLY = "pm12_text_only"


def start_core(name: str, device: str, tok: Any = None, **kwargs: Any) -> EngineCore:
    if name == "mlx":
        pytest.importorskip("mlx.core")
    core = EngineCore(lambda: load_backend(name, MODEL_DIR, device, "float32", max_batch=40, kv_cache_gib=1.0),
                      tok or tokenizer(MODEL_DIR), **kwargs).start()
    core.wait_ready()
    return core


@pytest.fixture(scope="module", params=BACKENDS)
def core(request: pytest.FixtureRequest) -> Iterator[EngineCore]:
    with one_torch_thread():
        started = start_core(*request.param)
        yield started
        started.close()


def params(ngram: int, max_new: int = GENERATED, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, no_repeat_ngram_size=ngram, **kwargs)


def source(core: EngineCore, case_id: str) -> PreparedInputs:
    """The case from its image on torch; from the reference embeddings on MLX (its CPU backend takes most of a
    minute per tiled page; the views' parity is test_model_parity's)."""
    assert core.backend is not None
    return V1.prepared(case_id) if core.backend.name == "torch" else V1.from_embeds(case_id)


def reference(case_id: str, kind: str = "greedy") -> list[int]:
    return V1.tensors(case_id)[f"{kind}.ids"].tolist()


@pytest.mark.slow
def test_every_case_generated_together_matches_its_reference(core: EngineCore) -> None:
    """All 12 cases x {greedy, n-gram 20, n-gram 35} with different budgets, as ONE continuous batch."""
    jobs = []
    steps_before = dict(core.batch_sizes)
    with core.paused():
        for i, case_id in enumerate(V1.case_ids()):
            prepared = source(core, case_id)
            for j, (kind, ngram) in enumerate(KINDS.items()):
                if f"{kind}.ids" in V1.tensors(case_id):
                    max_new = GENERATED - (i + 3 * j) % 7  # different budgets: sequences leave at different steps
                    jobs.append((case_id, kind, max_new, core.submit(prepared, params(ngram, max_new))))
    for case_id, kind, max_new, handle in jobs:
        assert handle.run().token_ids == reference(case_id, kind)[:max_new], f"{case_id} {kind}"
    sizes = {k: v - steps_before.get(k, 0) for k, v in core.batch_sizes.items()}
    assert max(k for k, v in sizes.items() if v) >= 10, sizes  # they really ran together


def test_joining_and_cancelling_mid_flight(core: EngineCore) -> None:
    early = ("pm01_doc_base", TEXT_ONLY, "pm05_banner_wide_base")
    with core.paused():
        first = {c: core.submit(V1.from_embeds(c), params(20)) for c in early}
        victim = core.submit(V1.from_embeds("pm07_gray_tiny"), params(20))
    start = core.steps
    while core.steps < start + 10:
        time.sleep(0.001)
    late = {c: core.submit(V1.from_embeds(c), params(20)) for c in ("pm03_table_gundam", "pm09_photo_large")}
    while core.steps < start + 13:
        time.sleep(0.001)
    victim.cancel()
    for case_id, handle in {**first, **late}.items():
        assert handle.run().token_ids == reference(case_id, "infer"), case_id
    result = victim.run()
    assert result.finish_reason == FINISH_CANCELLED
    assert result.token_ids == reference("pm07_gray_tiny", "infer")[: len(result.token_ids)]


def test_stops_after_eos_and_keeps_it() -> None:
    expected = reference(TEXT_ONLY)
    eos = expected[4]  # pretend the 5th greedy token is EOS

    class OtherEos:
        def __getattr__(self, name: str) -> Any:
            return eos if name == "eos_id" else getattr(tokenizer(MODEL_DIR), name)

    other = start_core("torch", "cpu", OtherEos())
    try:
        result = other.submit(V1.from_embeds(TEXT_ONLY), params(0)).run()
    finally:
        other.close()
    assert result.token_ids == expected[: expected.index(eos) + 1]
    assert result.finish_reason == FINISH_STOP


def test_cancel_stops_decoding_within_one_step(core: EngineCore, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = 0
    backend = core.backend
    original = backend.forward

    def counting(*args: Any) -> Any:
        nonlocal steps
        steps += 1
        return original(*args)

    monkeypatch.setattr(backend, "forward", counting)
    handle = core.submit(V1.from_embeds(TEXT_ONLY), params(0))
    stream = iter(handle)
    text = next(stream)
    stream.close()  # type: ignore[attr-defined]
    assert tokenizer(MODEL_DIR).decode(reference(TEXT_ONLY)).startswith(text)
    result = handle.run()
    assert result.finish_reason == FINISH_CANCELLED
    assert steps <= len(result.token_ids) + 1 < GENERATED


def test_sampling_is_seeded_per_sequence_whatever_the_batch(core: EngineCore) -> None:
    prepared = V1.from_embeds(TEXT_ONLY)
    greedy = reference(TEXT_ONLY)[:8]
    hot = params(0, 8, temperature=100.0, seed=1234)
    alone = core.submit(prepared, hot).run().token_ids
    assert alone == core.submit(prepared, hot).run().token_ids
    assert alone != greedy  # logits span ~200: at temperature 100 the 129k-token tail dominates
    with core.paused():
        crowd = [core.submit(V1.from_embeds(c), params(0, 8, temperature=1.5, seed=i))
                 for i, c in enumerate(("pm01_doc_base", "pm07_gray_tiny"))]
        seeded = core.submit(prepared, hot)
        unseeded = core.submit(prepared, params(0, 8, temperature=100.0))
    assert seeded.run().token_ids == alone
    assert unseeded.run().token_ids != alone  # no seed: fresh entropy
    for handle in crowd:
        handle.run()
    assert core.submit(prepared, params(0, 8, temperature=1.0, top_k=1, seed=7)).run().token_ids == greedy
    assert core.submit(prepared, params(0, 8, temperature=1.0, top_p=1e-6, seed=7)).run().token_ids == greedy


def test_ngram_ban_is_a_logit_mask(core: EngineCore) -> None:
    """n=1 bans every token already seen (prompt included), so no id repeats."""
    prepared = V1.from_embeds(TEXT_ONLY)
    ids = core.submit(prepared, params(1)).run().token_ids
    assert len(ids) == GENERATED
    assert not set(prepared.input_ids.tolist()) & set(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case_id", [TEXT_ONLY, "pm07_gray_tiny"])
def test_logprobs_are_the_reference_distribution(core: EngineCore, case_id: str) -> None:
    """Each generated token's log-probability and its top 5 come from the model's raw logits: at the prompt's last
    position they are log_softmax(last_logits); at every later step the top ids are the reference's raw top 5 and
    their differences are the raw logits' differences (the normaliser cancels)."""
    tensors = V1.tensors(case_id)
    result = core.submit(source(core, case_id), params(0, 12, logprobs=5)).run()
    assert result.token_ids == reference(case_id)[:12]
    assert result.logprobs is not None and [e.token_id for e in result.logprobs] == result.token_ids
    last = tensors["last_logits"].astype(np.float64)
    log_softmax = last - (last.max() + np.log(np.exp(last - last.max()).sum()))
    first = result.logprobs[0]
    assert first.logprob == pytest.approx(log_softmax[first.token_id], abs=2e-3)
    np.testing.assert_allclose(first.top_logprobs, log_softmax[first.top_ids], atol=2e-3)
    for step, entry in enumerate(result.logprobs):
        assert entry.top_ids == tensors["greedy.raw_top5_ids"][step].tolist()
        assert entry.logprob == entry.top_logprobs[0] <= 0.0  # greedy: the chosen token is the most likely
        raw = tensors["greedy.raw_top5_logits"][step].astype(np.float64)
        np.testing.assert_allclose(np.diff(entry.top_logprobs), np.diff(raw), atol=2e-3)
