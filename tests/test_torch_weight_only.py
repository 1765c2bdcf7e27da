"""Weight-only storage of the decoder (`--quantize bf16|int8`, dsocr_torch/weight_only.py): the products against
float32 references, the tiny models of both families against the reference fixtures, the prepared cache."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import BackendUnavailableError
from common.model.inputs import PreparedInputs
from dsocr_torch import aot, native, weight_only
from dsocr_torch.weight_only import (
    ROW_KERNEL_MAX_ROWS,
    ROW_KERNELS,
    RowKernels,
    dequantize,
    prepare_row_kernels,
    quantize_int8,
    standalone,
    weight_only_linear,
)
from tests.conftest import MODEL_DIR, rel_err
from tests.helpers_backend import FAMILIES, check_decoder, family_cases, generate, prefill, to_host


def test_int8_quantization_is_per_output_channel_within_half_a_step() -> None:
    weight = torch.randn(24, 40) * torch.logspace(-3, 1, 24)[:, None]  # rows of very different ranges
    weight[5] = 0.0
    quantized, scales = quantize_int8(weight)
    assert quantized.dtype == torch.int8 and scales.shape == (24,) and scales.dtype == torch.float32
    assert int(quantized.abs().max()) == 127 and torch.all(quantized[5] == 0) and float(scales[5]) == 1.0
    error = (dequantize(quantized, scales) - weight).abs()
    assert torch.all(error <= scales[:, None] / 2 + 1e-7)


def test_standalone_views_the_same_memory_from_its_start() -> None:
    stack = torch.arange(4 * 6 * 8, dtype=torch.float32).view(4, 6, 8).to(torch.int8)
    view = stack[2]
    alone = standalone(view)
    assert alone.storage_offset() == 0 and alone.data_ptr() == view.data_ptr() and torch.equal(alone, view)
    assert standalone(stack) is stack


def use_form(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the row products use `form` whatever this CPU would choose: "native" (the C kernels), or one of
    Inductor's ("plain" for bfloat16; "plain_scaled" or "words" for int8)."""
    if form == "native" and native.library() is None:
        pytest.skip("no AVX2 or no C compiler here: Inductor's kernels serve (tested in their forms)")
    monkeypatch.setattr(ROW_KERNELS, "native", form == "native")
    if form in ("plain_scaled", "words"):
        monkeypatch.setattr(ROW_KERNELS, "int8_form", form)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["bf16-native", "bf16-plain", "int8-native", "int8-plain_scaled", "int8-words"])
@pytest.mark.parametrize("rows", [1, ROW_KERNEL_MAX_ROWS, ROW_KERNEL_MAX_ROWS + 3])
def test_weight_only_linear_equals_float32_on_the_stored_values(
    storage: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both paths (row products up to ROW_KERNEL_MAX_ROWS rows, in every kernel form; the upcast past it), with a
    bias, against F.linear on the weight the storage stands for; float32 summation-order noise only. (A shape of
    the tiny model's: its compiled kernels serve both.)"""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=generator)
    stored, scales = quantize_int8(weight) if storage.startswith("int8") else (weight.bfloat16(), None)
    bias = torch.randn(96, generator=generator)
    x = torch.randn(1, rows, 40, generator=generator)
    prepare_row_kernels([(stored, scales)])
    use_form(storage.split("-")[1], monkeypatch)
    with torch.inference_mode():
        got = weight_only_linear(x, stored, scales, bias)
    want = F.linear(x, dequantize(stored, scales), bias)
    assert got.shape == (1, rows, 96) and got.dtype == torch.float32
    assert rel_err(got.numpy(), want.numpy()) < 1e-5


@pytest.mark.slow
def test_the_compiled_row_product_is_checked_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Inductor compiles (a C++ compiler is present), the check passes on several shapes, views of a stack
    included, and the compiled kernel serves them."""
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler here: the eager reference serves (tested above)")
    monkeypatch.setattr(ROW_KERNELS, "native", False)  # Inductor's kernels (the C ones: tests/test_torch_native.py)
    monkeypatch.setattr(ROW_KERNELS, "_checked", {})
    weights = quantize_int8(torch.randn(3, 32, 40))  # shapes of the tiny model's, and an odd one
    assert prepare_row_kernels([(weights[0][1], weights[1][1])]), ROW_KERNELS.disabled_reason
    assert ROW_KERNELS.disabled_reason is None
    for shape in ((32, 40), (40, 96), (130, 7)):
        stored = torch.randn(shape).bfloat16()
        assert prepare_row_kernels([(stored, None)])


@pytest.mark.slow
def test_the_int8_form_is_measured_once_per_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's int8 form is timed by the first load on a CPU and remembered: a later load takes it without
    timing (near-equal timings would flip it, and a flip compiles the other form's kernels)."""
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler here: the eager reference serves")
    monkeypatch.setenv(aot.KERNEL_CACHE_ENV, str(tmp_path))
    weight, scales = quantize_int8(torch.randn(24, 40))
    first = RowKernels()
    first.native = False
    with torch.inference_mode():
        assert first.check(weight, scales)
    assert first.int8_form in ("plain_scaled", "words")
    assert aot.remembered(weight_only._INT8_FORM_CHOICE) == first.int8_form

    def no_timing(*args: object, **kwargs: object) -> float:
        raise AssertionError("timed again")

    monkeypatch.setattr(weight_only, "_seconds", no_timing)
    second = RowKernels()
    second.native = False
    with torch.inference_mode():
        assert second.check(weight, scales)
    assert second.int8_form == first.int8_form


# ---- the tiny models ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weight_only_backends() -> Any:
    """(family, quantize) -> the tiny model's torch backend, float32 compute, loaded once per module."""
    from common.engine.backend import load_backend

    backends: dict[tuple[str, str], Any] = {}

    def get(family: str, quantize: str) -> Any:
        if (family, quantize) not in backends:
            backends[family, quantize] = load_backend(
                "torch", FAMILIES[family].model_dir, "cpu", "float32", max_batch=1, kv_cache_gib=0.25,
                quantize=quantize,
            )
        return backends[family, quantize]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(("family", "case_id"), family_cases())
def test_bf16_weights_of_a_bf16_checkpoint_match_the_reference(
    weight_only_backends: Any, family: str, case_id: str
) -> None:
    """The fixtures' checkpoints are bfloat16, so bf16 storage holds the very values float32 compute upcasts:
    every layer, the logits and the 32 greedy ids match the reference at its float32 tolerance."""
    backend, fixtures = weight_only_backends(family, "bf16"), FAMILIES[family]
    assert backend.dtype == "float32 (bf16 weights)"
    check_decoder(backend, fixtures, case_id)
    ids, _ = generate(backend, fixtures.from_embeds(case_id), 32)
    assert ids == fixtures.tensors(case_id)["greedy.ids"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize(("family", "case_id"), [("deepseek-ocr", "pm07_gray_tiny"),
                                                 ("deepseek-ocr", "pm02_doc_gundam"),
                                                 ("deepseek-ocr-2", "pm08_rgba_nocrop768")])
def test_bf16_stored_vision_towers_compute_the_reference_page(
    weight_only_backends: Any, family: str, case_id: str
) -> None:
    """With --quantize the vision towers keep a bf16 checkpoint's weights in bf16 and compute in float32 from
    copies made a block at a time: the page through common's preprocessing gives the reference's ids."""
    backend, fixtures = weight_only_backends(family, "bf16"), FAMILIES[family]
    towers = backend.model.vision_towers()
    assert towers and all(p.dtype == torch.bfloat16 for t in towers.values() for p in t.parameters())
    ids, _ = generate(backend, fixtures.prepared(case_id), 32, fixtures.family.ngram.size)
    assert ids == fixtures.tensors(case_id)["infer.ids"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_int8_weights_stay_close_to_the_reference(weight_only_backends: Any, family: str) -> None:
    """int8 moves the logits by the weights' rounding: bounded here, measured at full size by
    benchmarks/bench_agreement.py. Where the reference's top-1 leads its runner-up by more than twice the error,
    the first greedy token is the reference's (a random tiny model's logits are often closer than that)."""
    backend, fixtures = weight_only_backends(family, "int8"), FAMILIES[family]
    decided = 0
    for case_id in fixtures.case_ids():
        reference = fixtures.tensors(case_id)["last_logits"]
        logits = to_host(prefill(backend, fixtures.from_embeds(case_id)))[0]
        assert rel_err(logits, reference) < 0.05, case_id
        runner_up, top = np.sort(reference)[-2:]
        if top - runner_up > 2 * float(np.abs(logits - reference).max()):
            decided += 1
            assert int(np.argmax(logits)) == int(np.argmax(reference)), case_id
    assert decided > 0  # the check above ran


@pytest.mark.slow
@pytest.mark.parametrize("form", ["native", "plain_scaled", "words"])
def test_int8_decode_steps_equal_the_prompt_path(weight_only_backends: Any, form: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step's row products (and a token's experts in one call, where used) in every int8 form give the
    logits that the prompt path (each weight upcast whole) gives for the same sequence: the same int8 weights,
    float32 summation order apart."""
    backend = weight_only_backends("deepseek-ocr", "int8")
    use_form(form, monkeypatch)
    prompt = np.arange(100, 124, dtype=np.int64)
    ids, step_logits = generate(backend, PreparedInputs(prompt, np.zeros(len(prompt), bool), []), 4,
                                until_eos=False)
    for step in range(1, 4):  # step 0's logits come from the prompt itself
        sequence = np.concatenate([prompt, np.asarray(ids[:step], dtype=np.int64)])
        whole = to_host(prefill(backend, PreparedInputs(sequence, np.zeros(len(sequence), bool), [])))[0]
        assert rel_err(step_logits[step], whole) < 1e-4, step


@pytest.mark.slow
def test_the_prepared_cache_holds_the_int8_layout_and_a_second_load_maps_it(prepared_model_copy: Path) -> None:
    from dsocr_torch.weights.loader import load_model

    first = load_model(prepared_model_copy, dtype="float32", quantize="int8")
    cache = prepared_model_copy / ".dsocr-prepared" / "float32-int8.bin"
    assert cache.is_file()
    second = load_model(prepared_model_copy, dtype="float32", quantize="int8")
    for a, b in ((first.lm_head, second.lm_head), (first.model.layers[0].self_attn.q_proj,
                                                   second.model.layers[0].self_attn.q_proj)):
        assert a.stored.dtype == torch.int8 and torch.equal(a.stored, b.stored)
        assert torch.equal(a.stored_scales, b.stored_scales)
    moe = second.moe_layers()[0][1]
    assert moe.stored is not None and moe.stored.gate_up.dtype == torch.int8
    assert torch.equal(first.moe_layers()[0][1].stored.down, moe.stored.down)
    maps = Path("/proc/self/maps").read_text()
    assert str(cache) in maps  # the second load's weights are the file's pages
    # Another storage is another file; float32 keeps its own.
    load_model(prepared_model_copy, dtype="float32", quantize="bf16")
    assert (prepared_model_copy / ".dsocr-prepared" / "float32-bf16.bin").is_file()


def test_quantize_is_refused_where_it_does_not_apply() -> None:
    from dsocr_torch.weights.loader import load_model

    with pytest.raises(BackendUnavailableError, match="--quantize"):
        load_model(MODEL_DIR, dtype="float32", quantize="int4")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            load_model(MODEL_DIR, device="cuda", quantize="int8")
