"""Generation with the torch backend through the one loop: exact ids against the fixtures, alone and batched,
sampling, stopping, and a decode step with no host sync."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from common.engine.generation import FINISH_CANCELLED
from common.engine.loop import GenerationLoop
from common.engine.sampling import SamplingParams
from common.model.inputs import PreparedInputs
from tests.conftest import MODEL_DIR, model_case_ids, one_torch_thread, rel_err
from tests.test_torch_model import DEVICES, TOLERANCE, case_data, prepared_inputs

# fixture key -> no_repeat_ngram_size used by the reference run (greedy: no ban; infer: 20; eval_mode: 35)
KINDS = {"greedy": 0, "infer": 20, "infer_eval": 35}
MAX_NEW = 32


@pytest.fixture(scope="module", params=DEVICES)
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    from dsocr_torch.backend import load

    with one_torch_thread():
        loaded = load(MODEL_DIR, device=request.param, dtype="float32", max_batch=40, kv_cache_gib=1.0)
        yield loaded
        loaded.close()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from common.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(MODEL_DIR)


def params(ngram: int, max_new: int = MAX_NEW, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, no_repeat_ngram_size=ngram, **kwargs)


def from_embeds(case_id: str) -> PreparedInputs:
    """The case's prompt with the reference inputs_embeds (decoder parity without vision differences)."""
    data = case_data(case_id)
    ids = data["input_ids"].numpy().astype(np.int64)
    return PreparedInputs(ids, np.zeros_like(ids, dtype=bool), [], inputs_embeds=data["inputs_embeds"].numpy())


def run_alone(backend: Any, tokenizer: Any, prepared: PreparedInputs, p: SamplingParams) -> list[int]:
    return GenerationLoop(backend, tokenizer).submit(prepared, p).run().token_ids


# Vision parity of every case is in test_torch_model; here the whole path runs from the images, batched.
def test_every_case_generated_together_matches_its_reference(backend: Any, tokenizer: Any) -> None:
    """All 12 cases x {greedy, n-gram 20, n-gram 35} with different lengths, as ONE continuous batch."""
    loop = GenerationLoop(backend, tokenizer, max_batch=40)
    jobs = []
    for i, case_id in enumerate(model_case_ids()):
        data = case_data(case_id)
        prepared = prepared_inputs(tokenizer, case_id)
        for j, (kind, ngram) in enumerate(KINDS.items()):
            if f"{kind}.ids" in data:
                max_new = MAX_NEW - (i + 3 * j) % 7  # different budgets: sequences leave at different steps
                jobs.append((case_id, kind, max_new, loop.submit(prepared, params(ngram, max_new))))
    results = [(case_id, kind, max_new, gen.run()) for case_id, kind, max_new, gen in jobs]
    for case_id, kind, max_new, result in results:
        assert result.token_ids == case_data(case_id)[f"{kind}.ids"].tolist()[:max_new], f"{case_id} {kind}"
    assert max(loop.batch_sizes) >= 10, loop.batch_sizes  # they really ran together


def test_garbage_in_unwritten_cache_never_reaches_a_sequence(tokenizer: Any) -> None:
    """A fresh cache is uninitialised memory: fill it with NaN and decode prompts of different lengths together.
    Shorter lanes read past their end (weight 0, but 0 x NaN is NaN) unless what they read is made finite."""
    from dsocr_torch.backend import load

    with one_torch_thread():
        fresh = load(MODEL_DIR, device="cpu", dtype="float32", max_batch=4, kv_cache_gib=0.25)
        try:
            fresh.cache.keys.fill_(float("nan"))
            fresh.cache.values.fill_(float("nan"))
            loop = GenerationLoop(fresh, tokenizer, max_batch=4)
            cases = model_case_ids()[:4]
            gens = {case_id: loop.submit(from_embeds(case_id), params(0)) for case_id in cases}
            for case_id, gen in gens.items():
                assert gen.run().token_ids == case_data(case_id)["greedy.ids"].tolist(), case_id
            assert len({from_embeds(c).input_ids.shape[0] for c in cases}) > 1  # lanes of different lengths
            assert max(loop.batch_sizes) == 4
        finally:
            fresh.close()


def test_joining_and_cancelling_mid_flight(backend: Any, tokenizer: Any) -> None:
    loop = GenerationLoop(backend, tokenizer)
    early = ("pm01_doc_base", "pm12_text_only", "pm05_banner_wide_base")
    first = {c: loop.submit(from_embeds(c), params(20)) for c in early}
    victim = loop.submit(from_embeds("pm07_gray_tiny"), params(20))
    for _ in range(10):
        loop.step()
    late = {c: loop.submit(from_embeds(c), params(20)) for c in ("pm03_table_gundam", "pm09_photo_large")}
    for _ in range(3):
        loop.step()
    victim.cancel()
    for case_id, gen in {**first, **late}.items():
        assert gen.run().token_ids == case_data(case_id)["infer.ids"].tolist(), case_id
    assert victim.result is not None and victim.result.finish_reason == FINISH_CANCELLED
    reference = case_data("pm07_gray_tiny")["infer.ids"].tolist()
    assert victim.result.token_ids == reference[: len(victim.result.token_ids)]


@pytest.mark.parametrize("case_id", model_case_ids())
def test_ids_and_raw_logits_match_every_reference_run(
    backend: Any, tokenizer: Any, case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """greedy / infer / infer_eval ids exactly, and every step's raw top-5 logits within tolerance."""
    data = case_data(case_id)
    raw: list[torch.Tensor] = []
    original = backend.sample

    def recording(logits: torch.Tensor, controls: Any) -> torch.Tensor:
        raw.append(logits[0].clone())
        return original(logits, controls)

    monkeypatch.setattr(backend, "sample", recording)
    for kind, ngram in KINDS.items():
        if f"{kind}.ids" not in data:
            continue
        raw.clear()
        ids = run_alone(backend, tokenizer, from_embeds(case_id), params(ngram))
        assert ids == data[f"{kind}.ids"].tolist(), f"{case_id} {kind}"
        ref_ids, ref_logits = data[f"{kind}.raw_top5_ids"], data[f"{kind}.raw_top5_logits"]
        assert len(raw) == ref_ids.shape[0]
        ours = torch.stack([step.cpu()[ref_ids[i]] for i, step in enumerate(raw)])
        err = rel_err(ours.numpy(), ref_logits.numpy())
        assert err <= TOLERANCE, f"{case_id} {kind} raw top-5 logits: {err:.2e}"
        top1 = torch.stack([step.argmax() for step in raw]).cpu()
        assert torch.equal(top1, ref_ids[:, 0]), f"{case_id} {kind}: raw argmax differs"


def test_stops_after_eos_and_yields_it(backend: Any, tokenizer: Any) -> None:
    reference = case_data("pm12_text_only")["greedy.ids"].tolist()
    eos = reference[4]  # pretend the 5th greedy token is EOS

    class OtherEos:
        def __getattr__(self, name: str) -> Any:
            return eos if name == "eos_id" else getattr(tokenizer, name)

    result = GenerationLoop(backend, OtherEos()).submit(from_embeds("pm12_text_only"), params(0)).run()  # type: ignore[arg-type]
    assert result.token_ids == reference[: reference.index(eos) + 1]
    assert result.finish_reason == "stop"


def test_cancel_stops_decoding_within_one_step(backend: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = 0
    original = backend.forward

    def counting(*args: Any) -> Any:
        nonlocal steps
        steps += 1
        return original(*args)

    monkeypatch.setattr(backend, "forward", counting)
    gen = GenerationLoop(backend, tokenizer).submit(from_embeds("pm12_text_only"), params(0))
    stream = iter(gen)
    first = [next(stream), next(stream)]
    stream.close()  # type: ignore[attr-defined]
    assert "".join(first) == tokenizer.decode(case_data("pm12_text_only")["greedy.ids"].tolist()[:2])
    assert gen.result is not None and gen.result.finish_reason == FINISH_CANCELLED
    assert steps <= 3


def test_sampling_is_seeded_per_sequence_whatever_the_batch(backend: Any, tokenizer: Any) -> None:
    prepared = from_embeds("pm12_text_only")
    greedy = case_data("pm12_text_only")["greedy.ids"].tolist()[:8]
    hot = params(0, 8, temperature=100.0, seed=1234)
    alone = run_alone(backend, tokenizer, prepared, hot)
    assert alone == run_alone(backend, tokenizer, prepared, hot)
    assert alone != greedy  # logits span ~200: at temperature 100 the 129k-token tail dominates
    loop = GenerationLoop(backend, tokenizer)
    crowd = [loop.submit(from_embeds(c), params(0, 8, temperature=1.5, seed=i)) for i, c in
             enumerate(("pm01_doc_base", "pm07_gray_tiny"))]
    seeded = loop.submit(prepared, hot)
    unseeded = loop.submit(prepared, params(0, 8, temperature=100.0))
    assert seeded.run().token_ids == alone
    assert unseeded.run().token_ids != alone  # no seed: fresh entropy
    for gen in crowd:
        gen.run()
    assert run_alone(backend, tokenizer, prepared, params(0, 8, temperature=1.0, top_k=1, seed=7)) == greedy
    assert run_alone(backend, tokenizer, prepared, params(0, 8, temperature=1.0, top_p=1e-6, seed=7)) == greedy


def test_ngram_ban_is_a_logit_mask(backend: Any, tokenizer: Any) -> None:
    """n=1 bans every token already seen (prompt included), so no id repeats."""
    data = case_data("pm12_text_only")
    ids = run_alone(backend, tokenizer, from_embeds("pm12_text_only"), params(1))
    seen = set(data["input_ids"].tolist())
    assert len(ids) == MAX_NEW
    assert not seen & set(ids) and len(set(ids)) == len(ids)


def test_batched_decode_step_never_reads_back_to_the_host(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four lanes with different lengths: one decode step (attention, MoE, RoPE, cache writes) has no sync."""
    model, cache = backend.model, backend.cache
    cases = ("pm02_doc_gundam", "pm12_text_only", "pm07_gray_tiny", "pm01_doc_base")
    with torch.inference_mode():
        for lane, case_id in enumerate(cases):
            embeds = case_data(case_id)["inputs_embeds"][None].to(model.device)
            model.prefill_embeds(embeds, cache, lane=lane)
    lengths = list(cache.host_lengths[:4])
    assert len(set(lengths)) == 4
    tokens = torch.tensor([5, 6, 7, 8], device=model.device)

    def forbidden(*_: Any, **__: Any) -> None:
        raise AssertionError("host sync inside the decode step")

    for name in ("item", "tolist", "cpu", "nonzero", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with torch.inference_mode():
        logits = model.decode_step(tokens, cache)
    monkeypatch.undo()
    assert logits.shape == (4, model.config.language.vocab_size)
    assert bool(torch.isfinite(logits).all())
    assert cache.host_lengths[:4] == [n + 1 for n in lengths]
    assert cache.lengths[:4].tolist() == [n + 1 for n in lengths]
    # Each lane's row equals that lane decoded alone (a lane does not see another lane's keys).
    with torch.inference_mode():
        for lane, case_id in enumerate(cases):
            embeds = case_data(case_id)["inputs_embeds"][None].to(model.device)
            model.prefill_embeds(embeds, cache, lane=0)
            alone = model.decode_step(tokens[lane : lane + 1], cache)
            assert rel_err(alone[0].cpu().numpy(), logits[lane].cpu().numpy()) < 1e-5, case_id


def test_bfloat16_compute_runs_every_case(tokenizer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """bf16 is compared loosely (the reference itself moves ~1% in bf16): report, assert only that it runs."""
    from dsocr_torch.backend import load

    with one_torch_thread():
        bf16 = load(MODEL_DIR, device="cpu", dtype="bfloat16", kv_cache_gib=1.0)
        loop = GenerationLoop(bf16, tokenizer, max_batch=12)
        gens = {case_id: loop.submit(prepared_inputs(tokenizer, case_id), params(0)) for case_id in model_case_ids()}
        lines = []
        for case_id, gen in gens.items():
            ids = gen.run().token_ids
            reference = case_data(case_id)["greedy.ids"].tolist()
            agree = next((i for i, (a, b) in enumerate(zip(ids, reference, strict=False)) if a != b), len(ids))
            assert len(ids) == MAX_NEW or ids[-1] == bf16.eos_token_id
            lines.append(f"{case_id}: greedy prefix equal {agree}/{MAX_NEW}")
        with capsys.disabled():
            print("\nbfloat16 compute vs float32 reference (batched):\n  " + "\n  ".join(lines))
