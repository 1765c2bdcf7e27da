"""Generation with the torch backend: exact token ids against the fixtures, sampling, stopping, no host sync."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from common.sampling import SamplingParams
from tests.conftest import MODEL_DIR, model_case_ids, rel_err
from tests.test_torch_model import DEVICES, TOLERANCE, case_data, prepared_inputs

# fixture key -> no_repeat_ngram_size used by the reference run (greedy: no ban; infer: 20; eval_mode: 35)
KINDS = {"greedy": 0, "infer": 20, "infer_eval": 35}
MAX_NEW = 32


@pytest.fixture(scope="module", params=DEVICES)
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    from dsocr_torch.backend import load

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = load(MODEL_DIR, device=request.param, dtype="float32")
    yield loaded
    loaded.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from common.tokenizer import Tokenizer

    return Tokenizer.from_dir(MODEL_DIR)


def params(ngram: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=MAX_NEW, no_repeat_ngram_size=ngram, **kwargs)


# Vision parity of every case is in test_torch_model; here the whole backend path runs on one case per layout.
END_TO_END = ["pm01_doc_base", "pm02_doc_gundam", "pm12_text_only"]


@pytest.mark.parametrize("case_id", END_TO_END)
def test_backend_generates_reference_ids_end_to_end(backend: Any, tokenizer: Any, case_id: str) -> None:
    """PreparedInputs from the fixture image -> backend.generate, with infer()'s n-gram 20 rule."""
    prepared = prepared_inputs(tokenizer, case_id)
    ids = list(backend.generate(prepared, params(20)))
    assert ids == case_data(case_id)["infer.ids"].tolist()


@pytest.mark.parametrize("case_id", model_case_ids())
def test_ids_and_raw_logits_match_every_reference_run(backend: Any, case_id: str) -> None:
    """greedy / infer / infer_eval ids exactly, and every step's raw top-5 logits within tolerance."""
    from dsocr_torch.generate import generate_ids

    data = case_data(case_id)
    model = backend.model
    embeds = data["inputs_embeds"][None]
    for kind, ngram in KINDS.items():
        if f"{kind}.ids" not in data:
            continue
        raw: list[torch.Tensor] = []
        ids = list(
            generate_ids(model, data["input_ids"], None, [], params(ngram), 1, inputs_embeds=embeds, raw_logits=raw)
        )
        assert ids == data[f"{kind}.ids"].tolist(), f"{case_id} {kind}"
        ref_ids, ref_logits = data[f"{kind}.raw_top5_ids"], data[f"{kind}.raw_top5_logits"]
        assert len(raw) == ref_ids.shape[0]
        ours = torch.stack([step.cpu()[ref_ids[i]] for i, step in enumerate(raw)])
        err = rel_err(ours.numpy(), ref_logits.numpy())
        assert err <= TOLERANCE, f"{case_id} {kind} raw top-5 logits: {err:.2e}"
        top1 = torch.stack([step.argmax() for step in raw]).cpu()
        assert torch.equal(top1, ref_ids[:, 0]), f"{case_id} {kind}: raw argmax differs"


def test_stops_after_eos_and_yields_it(backend: Any) -> None:
    from dsocr_torch.generate import generate_ids

    data = case_data("pm12_text_only")
    reference = data["greedy.ids"].tolist()
    eos = reference[4]  # pretend the 5th greedy token is EOS
    first = reference.index(eos)
    ids = list(generate_ids(backend.model, data["input_ids"], None, [], params(0), eos))
    assert ids == reference[: first + 1]


def test_max_new_tokens_bounds_the_output(backend: Any, tokenizer: Any) -> None:
    prepared = prepared_inputs(tokenizer, "pm12_text_only")
    ids = list(backend.generate(prepared, SamplingParams(max_new_tokens=3, no_repeat_ngram_size=0)))
    assert ids == case_data("pm12_text_only")["greedy.ids"].tolist()[:3]


def test_closing_the_generator_stops_decoding(backend: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = backend.model
    steps = 0
    original = model.step

    def counting_step(*args: Any) -> torch.Tensor:
        nonlocal steps
        steps += 1
        return original(*args)

    monkeypatch.setattr(model, "step", counting_step)
    stream = backend.generate(prepared_inputs(tokenizer, "pm12_text_only"), params(0))
    first_two = [next(stream), next(stream)]
    stream.close()
    assert first_two == case_data("pm12_text_only")["greedy.ids"].tolist()[:2]
    assert steps == 1  # the second id needed one decode step; nothing ran after close()
    with pytest.raises(StopIteration):
        next(stream)


def test_sampling_is_seeded_and_degenerates_to_greedy(backend: Any, tokenizer: Any) -> None:
    prepared = prepared_inputs(tokenizer, "pm12_text_only")
    greedy = case_data("pm12_text_only")["greedy.ids"].tolist()[:8]

    def run(**kwargs: Any) -> list[int]:
        return list(backend.generate(prepared, SamplingParams(max_new_tokens=8, no_repeat_ngram_size=0, **kwargs)))

    hot = {"temperature": 100.0, "seed": 1234}
    first, again = run(**hot), run(**hot)
    assert first == again
    assert len(first) == 8 and all(0 <= t < backend.model.config.language.vocab_size for t in first)
    assert first != greedy  # logits span ~200: at temperature 100 the 129k-token tail dominates
    assert run(temperature=1.0, top_k=1, seed=7) == greedy
    assert run(temperature=1.0, top_p=1e-6, seed=7) == greedy


def test_top_k_and_top_p_restrict_the_candidates(backend: Any) -> None:
    from dsocr_torch.generate import Sampler

    logits = torch.tensor([0.0, 5.0, 4.0, 1.0, 3.0], device=backend.model.device)
    top_k = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0), logits.device)
    assert {int(top_k(logits)) for _ in range(200)} == {1, 2}
    # softmax: p(1)=0.64, p(2)=0.24, p(4)=0.09 ...; top_p 0.8 keeps {1, 2}
    top_p = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0), logits.device)
    assert {int(top_p(logits)) for _ in range(200)} == {1, 2}


def test_ngram_ban_is_a_logit_mask(backend: Any) -> None:
    """A repeated greedy token is banned by n=1 (every seen token), so no id repeats."""
    from dsocr_torch.generate import generate_ids

    data = case_data("pm12_text_only")
    ids = list(generate_ids(backend.model, data["input_ids"], None, [], params(1), 1))
    seen = set(data["input_ids"].tolist())
    assert len(ids) == MAX_NEW
    assert not seen & set(ids) and len(set(ids)) == len(ids)


def test_decode_step_never_reads_back_to_the_host(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = backend.model
    data = case_data("pm02_doc_gundam")
    embeds = data["inputs_embeds"][None].to(model.device)
    cache = model.new_cache(embeds.shape[1] + 2)
    with torch.inference_mode():
        model.prefill_embeds(embeds, cache)

    def forbidden(*_: Any, **__: Any) -> None:
        raise AssertionError("host sync inside the decode step")

    for name in ("item", "tolist", "cpu", "nonzero", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with torch.inference_mode():
        logits = model.step(torch.tensor([5], device=model.device), cache, embeds.shape[1])
    monkeypatch.undo()
    assert logits.shape == (model.config.language.vocab_size,)
    assert bool(torch.isfinite(logits).all())


def test_bfloat16_compute_runs_every_case(tokenizer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """bf16 is compared loosely (the reference itself moves ~1% in bf16): report, assert only that it runs."""
    from dsocr_torch.backend import load
    from dsocr_torch.generate import generate_ids

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bf16 = load(MODEL_DIR, device="cpu", dtype="bfloat16")
        lines = []
        for case_id in model_case_ids():
            data = case_data(case_id)
            prepared = prepared_inputs(tokenizer, case_id)
            images = [bf16.image_tensors(img) for img in prepared.images]
            mask = torch.from_numpy(prepared.images_seq_mask) if images else None
            raw: list[torch.Tensor] = []
            ids = list(
                generate_ids(
                    bf16.model, torch.from_numpy(prepared.input_ids), mask, images, params(0), 1, raw_logits=raw
                )
            )
            logits, ref = raw[0].cpu(), data["last_logits"]
            diff = float((logits - ref).abs().max())
            reference = data["greedy.ids"].tolist()
            agree = next((i for i, (a, b) in enumerate(zip(ids, reference, strict=False)) if a != b), len(ids))
            assert len(ids) == MAX_NEW or ids[-1] == bf16.eos_token_id
            assert np.isfinite(diff)
            lines.append(
                f"{case_id}: last_logits max|diff| {diff:.3g} / ref absmax {float(ref.abs().max()):.3g}, "
                f"top1 equal {int(logits.argmax()) == int(ref.argmax())}, greedy prefix equal {agree}/{MAX_NEW}"
            )
        with capsys.disabled():
            print("\nbfloat16 compute vs float32 reference:\n  " + "\n  ".join(lines))
    finally:
        torch.set_num_threads(threads)
