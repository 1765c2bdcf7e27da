"""Both model families on every backend (float32) against the reference fixtures, stage by stage.

Vision: the projector from the stored encoder outputs, the image-token layout from the stored projector outputs,
and the whole path from the fixture image (common's preprocessing, each view's encoder and projector, the
prompt's embeddings, the decoder). Decoder: every layer output, MoE routing, final norm and last-position
logits from the fixtures' inputs_embeds, so decoder errors are not mixed with vision errors. Generation: the
reference's three runs of 32 tokens (greedy; infer()'s n-gram 20; infer(eval_mode)'s n-gram 35), ids exactly
and each step's raw top-5 logits; a few cases end to end from the image; half precision, loosely (the reference
itself moves by ~1% of the logit range in bfloat16). Everything runs through the backend's prompt units
(`encode_view`, `embed_prompt`, `prefill`), driven by a PrefillJob, and its decode steps.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from common.engine.backend import Backend, Trace
from tests.conftest import one_torch_thread, rel_err, safetensors_names
from tests.helpers_backend import (
    BACKENDS,
    FAMILIES,
    GENERATED,
    KINDS,
    check_decoder,
    family_cases,
    generate,
    loaded,
    prefill,
    to_device,
    to_host,
    within,
)

V2 = "deepseek-ocr-2"
# What every backend traces per view (common.engine.backend.Backend) and every image case stores.
ENCODER_OUTPUTS = {"deepseek-ocr": {"sam_out", "clip_out", "projector_out"},
                   V2: {"sam_out", "qwen2_out", "projector_out"}}

# Cases run from the image through generation: the cheapest views, a tiled page (torch only: slow on MLX's
# CPU), and a text-only prompt.
END_TO_END = {
    "deepseek-ocr": ["pm07_gray_tiny", "pm08_rgba_small", "pm02_doc_gundam", "pm12_text_only"],
    V2: ["pm08_rgba_nocrop768", "pm01_doc_default", "pm12_text_only"],
}
TILED = {"pm02_doc_gundam", "pm01_doc_default"}
HALF = [  # (backend, dtype, family, cases): what each backend runs in half precision on its CPU
    pytest.param("torch", "bfloat16", V2, ("pm01_doc_default", "pm12_text_only"), id="torch-bfloat16"),
    pytest.param("mlx", "bfloat16", V2, ("pm08_rgba_nocrop768",), id="mlx-bfloat16", marks=pytest.mark.mlx),
    pytest.param("mlx", "float16", V2, ("pm08_rgba_nocrop768",), id="mlx-float16", marks=pytest.mark.mlx),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(params=BACKENDS)
def backend_on(request: pytest.FixtureRequest) -> Any:
    """backend_on(family) -> that family's tiny model on this (backend, device), float32."""
    name, device = request.param
    return lambda family: loaded(name, device, family)


def module_of(backend: Backend, part: str) -> Any:
    return importlib.import_module(f"dsocr_{backend.name}.{part}")


def views_of(trace: Trace, role: str) -> dict[str, np.ndarray]:
    """The traced encoder outputs of the global view ("global", the first) or of every tile ("local", batched
    as the fixtures store them)."""
    views = trace["views"][:1] if role == "global" else trace["views"][1:]
    return {name: np.concatenate([to_host(v[name]) for v in views]) for name in views[0]}


@pytest.mark.parametrize(("family", "case_id"), family_cases(images=True))
def test_projector_matches_reference(backend_on: Any, family: str, case_id: str) -> None:
    backend, fixtures = backend_on(family), FAMILIES[family]
    data, case = fixtures.tensors(case_id), fixtures.case(case_id)
    for role in ("global", "local") if case["n_local_crops"] else ("global",):
        if family == V2:
            inputs = [data[f"vision.{role}.qwen2_out"]]
        else:
            sam_out = data[f"vision.{role}.sam_out"]
            if backend.name == "mlx":  # MLX keeps SAM's features channels-last
                sam_out = sam_out.transpose(0, 2, 3, 1)
            inputs = [sam_out, data[f"vision.{role}.clip_out"]]
        projected = backend.model.model.project(*(to_device(backend, x) for x in inputs))
        within(projected, data[f"vision.{role}.projector_out"], f"{case_id} {role} projector_out", fixtures.tolerance)


@pytest.mark.parametrize(("family", "case_id"), family_cases(images=True))
def test_image_token_layout_matches_reference(backend_on: Any, family: str, case_id: str) -> None:
    """The reference's projected views gathered by common's layout rows -> image_embeds and inputs_embeds."""
    backend, fixtures = backend_on(family), FAMILIES[family]
    data, case = fixtures.tensors(case_id), fixtures.case(case_id)
    prepared = fixtures.prepared(case_id)
    np.testing.assert_array_equal(prepared.input_ids, data["input_ids"])
    np.testing.assert_array_equal(prepared.images_seq_mask, data["images_seq_mask"])
    views = [data["vision.global.projector_out"][0]]
    if case["n_local_crops"]:
        views += list(data["vision.local.projector_out"])
    trace: Trace = {}
    backend.embed_prompt(prepared, [to_device(backend, v) for v in views], trace)
    embeds = to_host(trace["inputs_embeds"])
    assert int(prepared.images_seq_mask.sum()) == case["n_image_tokens"]
    within(embeds[prepared.images_seq_mask], data["image_embeds"], f"{case_id} image_embeds", fixtures.tolerance)
    within(embeds, data["inputs_embeds"], f"{case_id} inputs_embeds", fixtures.tolerance)


# MLX's CPU backend takes seconds a view: from the image to the logits it runs one case per mode, tiling and page
# shape of each family (torch runs every case; MLX's decoder runs every case in test_decoder_matches_reference).
MLX_IMAGE_CASES = {
    "deepseek-ocr": {"pm01_doc_base", "pm04_receipt_tall_gundam", "pm06_small_gundam", "pm07_gray_tiny",
                     "pm08_rgba_small", "pm09_photo_large", "pm12_text_only"},
    "deepseek-ocr-2": {"pm02_doc_nocrop1024", "pm04_receipt_tall_default", "pm06_small_default",
                       "pm08_rgba_nocrop768", "pm11_palette_default", "pm12_text_only"},
}


def image_to_logits_cases() -> list[Any]:
    params = []
    for backend in BACKENDS:
        for case in family_cases():
            family, case_id = case.values
            if backend.values[0][0] == "mlx" and case_id not in MLX_IMAGE_CASES[family]:
                continue
            params.append(pytest.param(backend.values[0], family, case_id, id=f"{backend.id}-{case.id}",
                                       marks=[*backend.marks, *case.marks]))
    return params


@pytest.mark.slow
@pytest.mark.parametrize(("backend_on", "family", "case_id"), image_to_logits_cases(), indirect=["backend_on"])
def test_image_to_logits_matches_reference(backend_on: Any, family: str, case_id: str) -> None:
    """Fixture image -> common preprocessing -> each view's encoder and projector -> inputs_embeds -> decoder,
    every stage against the reference."""
    backend, fixtures = backend_on(family), FAMILIES[family]
    data, tolerance = fixtures.tensors(case_id), fixtures.tolerance
    prepared = fixtures.prepared(case_id)
    np.testing.assert_array_equal(prepared.input_ids, data["input_ids"])
    trace: Trace = {}
    logits = prefill(backend, prepared, trace)
    if prepared.images:
        np.testing.assert_array_equal(prepared.images_seq_mask, data["images_seq_mask"])
        roles = ("global", "local") if fixtures.case(case_id)["n_local_crops"] else ("global",)
        assert len(trace["views"]) == 1 + fixtures.case(case_id)["n_local_crops"]
        assert {key.split(".")[1] for key in data if key.startswith("vision.")} == set(roles)
        for role in roles:
            outputs = views_of(trace, role)
            stored = {key.split(".")[2] for key in data if key.startswith(f"vision.{role}.")}
            # Every stored encoder output is traced and compared; the ones every case stores are required.
            assert ENCODER_OUTPUTS[family] <= stored <= set(outputs), f"{case_id} {role}: {sorted(outputs)}"
            for name in stored:
                within(outputs[name], data[f"vision.{role}.{name}"], f"{case_id} {role} {name}", tolerance)
        embeds = to_host(trace["inputs_embeds"])
        within(embeds[prepared.images_seq_mask], data["image_embeds"], f"{case_id} image_embeds", tolerance)
    else:
        assert not prepared.images_seq_mask.any() and "views" not in trace
    within(trace["inputs_embeds"], data["inputs_embeds"], f"{case_id} inputs_embeds", tolerance)
    assert len(trace["layer_outputs"]) == data["layer_outputs"].shape[0]
    for i, output in enumerate(trace["layer_outputs"]):
        within(output[0], data["layer_outputs"][i], f"{case_id} layer {i} output", tolerance)
    within(trace["final_norm"][0], data["final_norm"], f"{case_id} final_norm", tolerance)
    within(logits[0], data["last_logits"], f"{case_id} last_logits", tolerance)


@pytest.mark.parametrize(("family", "case_id"), family_cases())
def test_decoder_matches_reference(backend_on: Any, family: str, case_id: str) -> None:
    check_decoder(backend_on(family), FAMILIES[family], case_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompt_skips_vision(backend_on: Any, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, fixtures = backend_on(family), FAMILIES[family]
    data = fixtures.tensors("pm12_text_only")

    def fail(*_: Any) -> None:
        raise AssertionError("vision ran for a text-only prompt")

    monkeypatch.setattr(backend.model, "encode_views", fail)
    trace: Trace = {}
    logits = prefill(backend, fixtures.prepared("pm12_text_only"), trace)
    assert "views" not in trace
    assert np.array_equal(to_host(trace["inputs_embeds"]), data["inputs_embeds"])  # an embedding lookup is exact
    within(logits[0], data["last_logits"], "pm12 last_logits", fixtures.tolerance)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_chunk(backend_on: Any, family: str) -> None:
    """The prompt in three chunks (each after the first attends to the cached ones) gives the reference's last
    logits, and nothing before the last chunk: the KV cache positions are right."""
    backend, fixtures = backend_on(family), FAMILIES[family]
    case_id = min(fixtures.case_ids(images=True), key=lambda c: fixtures.case(c)["input_len"])
    inputs = fixtures.from_embeds(case_id)
    chunk = -(-inputs.prompt_tokens // 3)
    logits = prefill(backend, inputs, chunk=chunk)
    within(logits[0], fixtures.tensors(case_id)["last_logits"], f"{case_id} chunked last_logits", fixtures.tolerance)
    embeds = backend.embed_prompt(inputs, [])
    assert backend.prefill(0, embeds, 0, chunk) is None


# ---- DeepSeek-OCR 2's encoder ---------------------------------------------------------------------------------


def test_v2_model_is_the_ocr2_family(backend_on: Any) -> None:
    backend = backend_on(V2)
    assert isinstance(backend.model.model, module_of(backend, "model").DeepseekOCR2Model)
    assert not hasattr(backend.model.model, "vision_model") and not hasattr(backend.model.model, "image_newline")


def _qwen2_debug_cases() -> list[str]:
    """The DeepSeek-OCR 2 cases that store the encoder's internals (two of them: a collection error if none)."""
    fixtures = FAMILIES[V2]
    cases = [c for c in fixtures.case_ids(images=True)
             if "qwen2_debug.global.input" in safetensors_names(fixtures.root / fixtures.case(c)["tensors"])]
    assert cases, "no DeepSeek-OCR 2 case stores qwen2_debug tensors"
    return cases


@pytest.mark.parametrize("case_id", _qwen2_debug_cases())
def test_qwen2_encoder_internals_match_reference(backend_on: Any, case_id: str) -> None:
    """Mask (bidirectional over features, causal over queries), [features, queries] input, every layer."""
    backend, fixtures = backend_on(V2), FAMILIES[V2]
    data = fixtures.tensors(case_id)
    views = sorted({k.split(".")[1] for k in data if k.startswith("qwen2_debug.")})
    assert views
    encoder = backend.model.model.qwen2_model
    for view in views:
        prefix = f"qwen2_debug.{view}."
        sam_out = data[f"vision.{view}.sam_out"][:1]  # local debug tensors: the first crop
        features = sam_out.reshape(1, sam_out.shape[1], -1).transpose(0, 2, 1)  # [1, n, dim], row-major
        mask = module_of(backend, "qwen2").encoder_attention_mask(features.shape[1])
        assert np.array_equal(to_host(mask), data[prefix + "attn_mask_allowed"]), f"{case_id} {view} mask"
        trace: dict[str, Any] = {}
        full = encoder(to_device(backend, features), trace)
        within(trace["input"], data[prefix + "input"], f"{case_id} {view} encoder input", fixtures.tolerance)
        layers = [k for k in data if k.startswith(prefix + "layer")]
        assert len(layers) == backend.model.config.qwen2.layers
        for name in layers:
            within(trace[name[len(prefix) :]], data[name], f"{case_id} {view} {name}", fixtures.tolerance)
        within(full, data[f"vision.{view}.qwen2_full_out"][:1], f"{case_id} {view} qwen2_full_out", fixtures.tolerance)


def test_v2_unsupported_view_size_is_refused(backend_on: Any) -> None:
    """Only 768 and 1024 px views have learned queries; another size is a clear error, not a crash inside."""
    backend = backend_on(V2)
    features = to_device(backend, np.zeros((1, 100, backend.model.config.qwen2.dim), np.float32))
    with pytest.raises(ValueError, match="no learned queries for 100 vision tokens"):
        backend.model.model.qwen2_model(features)


# ---- generation ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("family", "case_id"), family_cases())
def test_ids_and_raw_logits_match_every_reference_run(backend_on: Any, family: str, case_id: str) -> None:
    backend, fixtures = backend_on(family), FAMILIES[family]
    data = fixtures.tensors(case_id)
    kinds = [kind for kind in KINDS if f"{kind}.ids" in data]
    assert "greedy" in kinds and "infer" in kinds
    for kind in kinds:
        ids, raw = generate(backend, fixtures.from_embeds(case_id), GENERATED, KINDS[kind])
        assert ids == data[f"{kind}.ids"].tolist(), f"{case_id} {kind}"
        assert len(raw) == GENERATED
        ref_ids, ref_logits = data[f"{kind}.raw_top5_ids"], data[f"{kind}.raw_top5_logits"]
        ours = np.stack([step[ref_ids[i]] for i, step in enumerate(raw)])
        assert rel_err(ours, ref_logits) <= fixtures.tolerance, f"{case_id} {kind} raw top-5 logits"


@pytest.mark.slow
@pytest.mark.parametrize(("family", "case_id"), [(f, c) for f, cases in END_TO_END.items() for c in cases])
def test_backend_generates_reference_ids_end_to_end(backend_on: Any, family: str, case_id: str) -> None:
    """Fixture image -> common preprocessing -> the backend's prompt units and decode steps, infer()'s n-gram."""
    backend, fixtures = backend_on(family), FAMILIES[family]
    if backend.name == "mlx" and case_id in TILED:
        pytest.skip("a tiled page takes MLX's CPU backend most of a minute; the tiles' parity is tested per view")
    ids, _ = generate(backend, fixtures.prepared(case_id), GENERATED, fixtures.family.ngram.size)
    assert ids == fixtures.tensors(case_id)["infer.ids"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize(("backend_name", "dtype", "family", "cases"), HALF)
def test_half_precision_runs_close(
    backend_name: str, dtype: str, family: str, cases: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """Half precision on the CPU through vision and decoder, end to end (the tiny model's 20-wide experts once
    broke torch's bfloat16 grouped matmul there); loosely bounded, as the reference moves ~1% in bfloat16."""
    backend, fixtures = loaded(backend_name, "cpu", family, dtype), FAMILIES[family]
    lines = []
    for case_id in cases:
        data = fixtures.tensors(case_id)
        ids, raw = generate(backend, fixtures.prepared(case_id), 8)
        error = rel_err(raw[0], data["last_logits"])
        lines.append(f"{case_id}: last-logit rel {error:.2e}, greedy {ids} vs {data['greedy.ids'][:8].tolist()}")
        assert len(ids) == 8 and error < 0.05 and ids[0] == data["greedy.ids"][0]
    with capsys.disabled():
        print(f"\n{fixtures.family.title}, {backend_name} {dtype} vs float32 reference:\n  " + "\n  ".join(lines))
