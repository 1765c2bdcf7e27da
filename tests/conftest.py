"""Shared fixture access. Everything the suite reads lives under tests/fixtures/ (no ../shared needed)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures" / "deepseek-ocr"
MODEL_DIR = FIXTURES / "model"
# DeepSeek-OCR 2 (see its COPY.md for what differs from the shared set: view hashes, no SAM debug tensors).
FIXTURES_V2 = ROOT / "tests" / "fixtures" / "deepseek-ocr-2"
MODEL_DIR_V2 = FIXTURES_V2 / "model"


def fixture_tokenizer(model_dir: Path | str = MODEL_DIR) -> Any:
    """The model's Tokenizer, loaded once per process (it holds no state; loading it takes a third of a second)."""
    return _tokenizer(Path(model_dir).resolve())


@cache
def _tokenizer(model_dir: Path) -> Any:
    from common.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)


def model_context(model_dir: Path = MODEL_DIR) -> int:
    """The model's context in tokens: max_position_embeddings of its config.json."""
    return int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])


@cache
def cases_manifest() -> dict[str, Any]:
    return json.loads((FIXTURES / "cases.json").read_text())


def model_cases() -> list[dict[str, Any]]:
    """The 11 image cases plus the text-only case, in manifest order."""
    manifest = cases_manifest()
    return list(manifest["cases"]) + list(manifest["lm_only"])


def model_case_ids() -> list[str]:
    return [c["id"] for c in model_cases()]


def case_by_id(case_id: str) -> dict[str, Any]:
    for case in model_cases():
        if case["id"] == case_id:
            return case
    raise KeyError(case_id)


_NP_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U8": "u1", "BOOL": "?"}


def safetensors_names(path: Path) -> set[str]:
    """The tensor names of a safetensors file, from its header alone (no tensor is read)."""
    with path.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    return set(header) - {"__metadata__"}


def read_safetensors(path: Path) -> dict[str, Any]:
    """numpy arrays of a safetensors file; bfloat16 entries (numpy has none) come back as exact float32."""
    import numpy as np

    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    out: dict[str, Any] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = raw[base + start : base + end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=_NP_DTYPES[info["dtype"]]).copy()
        out[name] = arr.reshape(info["shape"])
    return out


@cache
def case_tensors(case_id: str) -> dict[str, Any]:
    """numpy arrays of cases/<id>.safetensors (bf16 entries, if any, come back as float32)."""
    return read_safetensors(FIXTURES / "cases" / f"{case_id}.safetensors")


@cache
def cases_manifest_v2() -> dict[str, Any]:
    return json.loads((FIXTURES_V2 / "cases.json").read_text())


def model_cases_v2() -> list[dict[str, Any]]:
    """DeepSeek-OCR 2: the 11 image cases plus the text-only case, in manifest order."""
    manifest = cases_manifest_v2()
    return list(manifest["cases"]) + list(manifest["lm_only"])


def case_by_id_v2(case_id: str) -> dict[str, Any]:
    return next(c for c in model_cases_v2() if c["id"] == case_id)


@cache
def case_tensors_v2(case_id: str) -> dict[str, Any]:
    return read_safetensors(FIXTURES_V2 / "cases" / f"{case_id}.safetensors")


# The fixture set names DeepSeek-OCR 2's three settings after infer()'s arguments; dsocr's presets of them:
V2_MODE_NAMES = {"default": "gundam", "nocrop_1024": "base", "nocrop_768": "small"}


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the block: the parity runs are tiny, and thread spinning on a busy 2-core machine
    costs more than it gives."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rel_err(actual: Any, expected: Any) -> float:
    """max|actual - expected| / max|expected|, the per-tensor parity measure used throughout."""
    import numpy as np

    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    scale = float(np.abs(e).max()) or 1.0
    return float(np.abs(a - e).max()) / scale


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return MODEL_DIR


MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture
def prepared_model_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the fixture model (config, tokenizer, weights), the prepared-layout cache allowed for its tiny
    size."""
    import shutil

    from dsocr_torch.weights import prepared

    monkeypatch.setattr(prepared, "MIN_BYTES", 0)
    monkeypatch.delenv(prepared.ENV, raising=False)
    folder = tmp_path / "model"
    folder.mkdir()
    for name in (*MODEL_FILES, "model.safetensors"):
        shutil.copy(MODEL_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
