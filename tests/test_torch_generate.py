"""What only the torch backend has: a KV cache allocated uninitialised (garbage never reaches a sequence), a decode
step without host syncs (what CUDA graphs need), and bfloat16 compute on the CPU, batched."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from common.engine.backend import load_backend
from common.engine.core import EngineCore
from common.engine.sampling import SamplingParams
from tests.conftest import MODEL_DIR, one_torch_thread, rel_err
from tests.helpers_backend import FAMILIES, GENERATED, tokenizer

V1 = FAMILIES["deepseek-ocr"]


def greedy(max_new: int = GENERATED) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, no_repeat_ngram_size=0)


def test_garbage_in_unwritten_cache_never_reaches_a_sequence() -> None:
    """A fresh cache is uninitialised memory: fill it with NaN and decode prompts of different lengths together.
    Shorter lanes read past their end (weight 0, but 0 x NaN is NaN) unless what they read is made finite."""

    def nan_filled() -> Any:
        backend = load_backend("torch", MODEL_DIR, "cpu", "float32", max_batch=4, kv_cache_gib=0.25)
        backend.cache.keys.fill_(float("nan"))
        backend.cache.values.fill_(float("nan"))
        return backend

    with one_torch_thread():
        core = EngineCore(nan_filled, tokenizer(MODEL_DIR), max_batch=4).start()
        try:
            core.wait_ready()
            cases = V1.case_ids()[:4]
            assert len({V1.from_embeds(c).prompt_tokens for c in cases}) > 1  # lanes of different lengths
            with core.paused():
                handles = {case_id: core.submit(V1.from_embeds(case_id), greedy()) for case_id in cases}
            for case_id, handle in handles.items():
                assert handle.run().token_ids == V1.tensors(case_id)["greedy.ids"].tolist(), case_id
            assert max(core.batch_sizes) == 4
        finally:
            core.close()


def test_batched_decode_step_never_reads_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four lanes with different lengths: one decode step (attention, MoE, RoPE, cache writes) has no sync."""
    backend = load_backend("torch", MODEL_DIR, "cpu", "float32", max_batch=4, kv_cache_gib=0.25)
    model, cache = backend.model, backend.cache
    cases = ("pm02_doc_gundam", "pm12_text_only", "pm07_gray_tiny", "pm01_doc_base")

    def prompt_into(lane: int, case_id: str) -> None:
        embeds = torch.from_numpy(V1.tensors(case_id)["inputs_embeds"])[None].to(model.device)
        model.prefill(embeds, cache, lane, 0)

    with torch.inference_mode():
        for lane, case_id in enumerate(cases):
            prompt_into(lane, case_id)
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
            prompt_into(0, case_id)
            alone = model.decode_step(tokens[lane : lane + 1], cache)
            assert rel_err(alone[0].cpu().numpy(), logits[lane].cpu().numpy()) < 1e-5, case_id
    backend.close()


@pytest.mark.slow
def test_bfloat16_compute_runs_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    """bf16 is compared loosely (the reference itself moves ~1% in bf16): report, assert that it runs and that
    every case's first token (the prompt's own logits) agrees."""
    with one_torch_thread():
        core = EngineCore(lambda: load_backend("torch", MODEL_DIR, "cpu", "bfloat16", kv_cache_gib=1.0),
                          tokenizer(MODEL_DIR), max_batch=12).start()
        try:
            core.wait_ready()
            with core.paused():
                handles = {case_id: core.submit(V1.prepared(case_id), greedy()) for case_id in V1.case_ids()}
            lines = []
            for case_id, handle in handles.items():
                ids = handle.run().token_ids
                expected = V1.tensors(case_id)["greedy.ids"].tolist()
                agree = next((i for i, (a, b) in enumerate(zip(ids, expected, strict=False)) if a != b), len(ids))
                assert len(ids) == GENERATED or ids[-1] == tokenizer(MODEL_DIR).eos_id
                assert agree >= 1, f"{case_id}: the first token differs in bfloat16"
                lines.append(f"{case_id}: greedy prefix equal {agree}/{GENERATED}")
        finally:
            core.close()
    with capsys.disabled():
        print("\nbfloat16 compute vs float32 reference (batched):\n  " + "\n  ".join(lines))
