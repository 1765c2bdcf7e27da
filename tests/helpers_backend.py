"""Running a backend as the engine does, for the model tests of both backends and both model families.

Every number these tests compare comes from the reference fixtures (tests/fixtures/<family>/, see their
README): `FamilyFixtures` reads them per family. A backend is loaded once per (backend, family, device, dtype)
and process; prompts go in through `common.engine.prefill.PrefillJob`, the production prefill path, and tokens
come out of the backend's own `sample`/`read`/`forward` with the reference's n-gram rule (common.engine.ngram).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.engine.backend import Backend, StepControls, Trace
from common.engine.ngram import NGramGuard
from common.engine.prefill import PrefillJob
from common.model.families import DEEPSEEK_OCR, DEEPSEEK_OCR_2, ModelFamily, resolve_mode
from common.model.inputs import PreparedInputs
from common.model.modes import Mode
from tests.conftest import (
    FIXTURES,
    FIXTURES_V2,
    MODEL_DIR,
    MODEL_DIR_V2,
    V2_MODE_NAMES,
    case_tensors,
    case_tensors_v2,
    cases_manifest,
    cases_manifest_v2,
    fixture_tokenizer,
    model_cases,
    model_cases_v2,
    rel_err,
)

PREFILL_CHUNK = 4096  # one chunk holds every fixture prompt; chunking has its own test
GENERATED = 32  # tokens of every reference run (max_new_tokens 32)
KINDS = {"greedy": 0, "infer": 20, "infer_eval": 35}  # reference run -> its no_repeat_ngram_size
# The router's weights are a softmax of the gate's logits (DeepSeek-OCR 2's tiny gate is scaled x8), so they
# carry a few times the hidden states' float32 reordering noise: MLX's reach 1.07e-5 of their range on one v2
# case (torch: 8.1e-6). A routing bug (a lost scaling factor or renormalisation, a half-precision gate) moves
# them by 1e-3 or more.
ROUTER_SLACK = {"mlx": 2.0}


@dataclass(frozen=True)
class FamilyFixtures:
    """One family's reference set: its tiny model, cases, tensors and the tolerance its README suggests."""

    family: ModelFamily
    root: Path
    model_dir: Path
    tolerance: float  # max|diff| <= tolerance x max|ref|, per tensor
    cases: Callable[[], list[dict[str, Any]]]
    tensors: Callable[[str], dict[str, np.ndarray]]
    manifest: Callable[[], dict[str, Any]]

    @property
    def name(self) -> str:
        return self.family.name

    def case(self, case_id: str) -> dict[str, Any]:
        return next(c for c in self.cases() if c["id"] == case_id)

    def entries(self) -> list[dict[str, Any]]:
        """The preprocessing entries (every image x setting, plus text before the image)."""
        return list(self.manifest()["preprocess"]["entries"])

    def entry(self, entry_id: str) -> dict[str, Any]:
        return next(e for e in self.entries() if e["id"] == entry_id)

    def mode_name(self, entry: dict[str, Any]) -> str:
        """The dsocr preset of an entry or case: v1's fixtures name its modes, v2's infer()'s three settings."""
        return V2_MODE_NAMES[entry["mode"]] if self.family is DEEPSEEK_OCR_2 else entry["mode"]

    def preset(self, entry: dict[str, Any]) -> Mode:
        """The family's preset of that name, checked against the sizes the entry was made with."""
        mode = resolve_mode(self.mode_name(entry), family=self.family)
        expected = (entry["base_size"], entry["image_size"], entry["crop_mode"])
        assert (mode.base_size, mode.image_size, mode.crop_mode) == expected, f"{entry['id']}: {mode}"
        return mode

    def case_ids(self, images: bool | None = None) -> list[str]:
        """Every case, or only those with (True) or without (False) an image."""
        return [c["id"] for c in self.cases() if images is None or (c.get("kind") != "lm_only") == images]

    def mode(self, case: dict[str, Any]) -> Mode:
        """The dsocr mode of a case: v1 names infer()'s arguments, v2 one of its three settings."""
        if self.family is DEEPSEEK_OCR_2:
            return resolve_mode(V2_MODE_NAMES[case["mode"]], family=self.family)
        return resolve_mode(case["mode"], base_size=case["base_size"], image_size=case["image_size"],
                            crop_mode=case["crop_mode"])

    def prepared(self, case_id: str) -> PreparedInputs:
        """The case's prompt and image through common's preprocessing (what a request gets)."""
        from common.documents.images import load_image
        from common.model.prompt import prepare_inputs

        case = self.case(case_id)
        if case.get("kind") == "lm_only":
            return prepare_inputs(tokenizer(self.model_dir), case["text"], [], resolve_mode(family=self.family))
        image = load_image(self.root / case["image"])
        return prepare_inputs(tokenizer(self.model_dir), case["prompt"], [image], self.mode(case))

    def from_embeds(self, case_id: str) -> PreparedInputs:
        """The case's prompt with the reference inputs_embeds (decoder parity without vision differences)."""
        data = self.tensors(case_id)
        ids = np.asarray(data["input_ids"], dtype=np.int64)
        return PreparedInputs(ids, np.zeros_like(ids, dtype=bool), [], inputs_embeds=data["inputs_embeds"])


FAMILIES = {
    DEEPSEEK_OCR.name: FamilyFixtures(DEEPSEEK_OCR, FIXTURES, MODEL_DIR, 1e-4, model_cases, case_tensors,
                                      cases_manifest),
    DEEPSEEK_OCR_2.name: FamilyFixtures(DEEPSEEK_OCR_2, FIXTURES_V2, MODEL_DIR_V2, 1e-5, model_cases_v2,
                                        case_tensors_v2, cases_manifest_v2),
}


def real_checkpoint(family: str) -> tuple[Path, dict[str, list[int]], int, int]:
    """The real model's config.json, its checkpoint's tensor shapes by name, and how many tensors and values
    that checkpoint has: from the listing where it says (DeepSeek-OCR 2's), else from the fixture README's
    description of real_checkpoint_shapes.json ("(2711 tensors, 3,336,106,497 values, ...")."""
    root = FAMILIES[family].root
    listing = json.loads((root / "real_checkpoint_shapes.json").read_text())
    if "n_tensors" in listing:
        counts = (listing["n_tensors"], listing["n_values"])
    else:
        readme = (root / "README.md").read_text()
        match = re.search(r"`real_checkpoint_shapes\.json`[^(]*\(([\d,]+) tensors, ([\d,]+) values", readme)
        assert match, f"{root / 'README.md'} does not give the real checkpoint's tensor and value counts"
        counts = (int(match.group(1).replace(",", "")), int(match.group(2).replace(",", "")))
    return root / "real_config.json", listing["tensors"], *counts


# The cases of each family that run in the quick subset (-m "not slow"): the cheapest views (v1's 512 px tiny
# mode, OCR 2's 768 px no-crop view) and the text-only prompt. Every other case is marked slow.
QUICK_CASES = {
    DEEPSEEK_OCR.name: {"pm07_gray_tiny", "pm12_text_only"},
    DEEPSEEK_OCR_2.name: {"pm08_rgba_nocrop768", "pm12_text_only"},
}


def family_cases(images: bool | None = None) -> list[Any]:
    """(family, case id) of every family's cases, for parametrizing; all but QUICK_CASES marked slow."""
    return [
        pytest.param(name, case_id, id=f"{name}-{case_id}",
                     marks=[] if case_id in QUICK_CASES[name] else [pytest.mark.slow])
        for name, fixtures in FAMILIES.items()
        for case_id in fixtures.case_ids(images)
    ]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# (backend, device) pairs a test runs on: torch on the CPU (and CUDA where there is one), MLX on its CPU.
BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("torch", "cuda"), id="torch-cuda",
                 marks=[pytest.mark.cuda, pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device")]),
    pytest.param(("mlx", "cpu"), id="mlx-cpu", marks=pytest.mark.mlx),
]


def tokenizer(model_dir: Path) -> Any:
    return fixture_tokenizer(model_dir)


@functools.cache
def loaded(backend: str, device: str, family: str, dtype: str = "float32") -> Backend:
    """The family's tiny model on a backend, loaded once per process (tests share it; each uses lane 0)."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from common.engine.backend import load_backend

    return load_backend(backend, FAMILIES[family].model_dir, device, dtype, max_batch=1, kv_cache_gib=0.25)


def backend_of(model: Any, max_batch: int = 1) -> Backend:
    """A backend around a model a test loaded itself (float32 or its own dtype, on its own device)."""
    if type(model).__module__.startswith("dsocr_torch"):
        from dsocr_torch.backend import TorchBackend

        return TorchBackend(model, max_batch=max_batch, kv_cache_gib=0.25)
    import mlx.core as mx

    from dsocr_mlx.backend import MlxBackend

    dtype = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}[model.dtype]
    return MlxBackend(model, "cpu", dtype, None, max_batch=max_batch, kv_cache_gib=0.25)


def to_host(value: Any) -> np.ndarray:
    """A device array of either backend (or a numpy array) -> numpy (floats as float32)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch; a copy, as a CPU tensor's numpy() shares its memory
        value = value.detach()
        return (value.float() if value.is_floating_point() else value).cpu().numpy().copy()
    import mlx.core as mx

    return np.array(value.astype(mx.float32) if mx.issubdtype(value.dtype, mx.floating) else value)


def to_device(backend: Backend, array: np.ndarray) -> Any:
    """A float numpy array -> the backend's device array in its compute dtype."""
    model = backend.model  # type: ignore[attr-defined]
    if backend.name == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(model.device, model.dtype)
    import mlx.core as mx

    return mx.array(np.asarray(array, dtype=np.float32)).astype(model.dtype)


def within(actual: Any, expected: np.ndarray, what: str, tolerance: float) -> float:
    error = rel_err(to_host(actual), expected)
    assert error <= tolerance, f"{what}: max|diff|/max|ref| = {error:.2e} > {tolerance:.0e}"
    return error


def prefill(
    backend: Backend, inputs: PreparedInputs, trace: Trace | None = None, chunk: int = PREFILL_CHUNK
) -> Any:
    """The prompt into lane 0 through a PrefillJob -> the last position's logits [1, V] (device)."""
    job = PrefillJob(backend, 0, inputs, chunk, trace)
    while not job.advance():
        pass
    return job.logits


def generate(
    backend: Backend,
    inputs: PreparedInputs,
    steps: int,
    ngram: int = 0,
    forced: list[int] | None = None,
    trace: Trace | None = None,
    until_eos: bool = True,
) -> tuple[list[int], list[np.ndarray]]:
    """Greedy ids and each step's raw logits (host [V]) for one prompt, stopping at EOS (`until_eos`). The n-gram
    rule sees the whole sequence, prompt included, as the reference's (Hugging Face `no_repeat_ngram_size`). With
    `forced` the model is fed those ids instead of its own (teacher forcing, to compare two models step by step).
    `trace` collects the prompt's intermediates."""
    logits = prefill(backend, inputs, trace)
    guard = NGramGuard(ngram)
    guard.reset(inputs.input_ids.tolist())
    ids: list[int] = []
    raw: list[np.ndarray] = []
    for step in range(steps):
        raw.append(to_host(logits)[0])
        banned = guard.banned()
        controls = StepControls.greedy(1)
        controls.ban_rows, controls.ban_ids = np.zeros(len(banned), np.int64), np.asarray(banned, np.int64)
        tokens = backend.sample(logits, controls)
        ids.append(int(backend.read(tokens)[0]))
        if (ids[-1] == backend.eos_token_id and until_eos) or step + 1 == steps:
            break
        fed = ids[-1] if forced is None else forced[step]
        guard.push(fed)
        logits = backend.forward(1, tokens if forced is None else np.array([fed], np.int64))
    return ids, raw


def check_decoder(backend: Backend, fixtures: FamilyFixtures, case_id: str) -> None:
    """From the reference inputs_embeds: every layer output, the final norm, the last logits and the MoE
    routing (as sets per token: top-k order is unspecified; weights matched by expert)."""
    data, tolerance = fixtures.tensors(case_id), fixtures.tolerance
    trace: Trace = {}
    logits = prefill(backend, fixtures.from_embeds(case_id), trace)
    layers = data["layer_outputs"]
    assert len(trace["layer_outputs"]) == layers.shape[0]
    for i, output in enumerate(trace["layer_outputs"]):
        within(output[0], layers[i], f"{case_id} layer {i} output", tolerance)
    within(trace["final_norm"][0], data["final_norm"], f"{case_id} final_norm", tolerance)
    within(logits[0], data["last_logits"], f"{case_id} last_logits", tolerance)
    lm = backend.model.config.language  # type: ignore[attr-defined]
    moe_layers = [i for i in range(lm.num_hidden_layers) if lm.is_moe_layer(i)]
    assert sorted(trace["topk_idx"]) == moe_layers
    for i in moe_layers:
        ids, ref_ids = to_host(trace["topk_idx"][i]).astype(np.int64), data[f"moe.layer{i}.topk_idx"]
        order, ref_order = np.argsort(ids, axis=-1), np.argsort(ref_ids, axis=-1)
        assert np.array_equal(np.take_along_axis(ids, order, -1), np.take_along_axis(ref_ids, ref_order, -1)), (
            f"{case_id} layer {i}: routed experts differ"
        )
        weights = np.take_along_axis(to_host(trace["topk_weight"][i]), order, -1)
        ref_weights = np.take_along_axis(data[f"moe.layer{i}.topk_weight"], ref_order, -1)
        router_tolerance = tolerance * ROUTER_SLACK.get(backend.name, 1.0)
        within(weights, ref_weights, f"{case_id} layer {i} topk_weight", router_tolerance)
